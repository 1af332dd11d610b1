//! Logical networks: a NAD annotated `trellis.dev/logical-network` is one tenant's
//! subnets carved out of a physical network that other tenants share (a macvlan or
//! ipvlan master, a bridge, an SR-IOV pool). trellis checks at ADD that the carved
//! subnets of one physical network do not overlap and that the pod's addresses are
//! in its network's; the dataplane lets a pod's packets through only with both
//! addresses in its network's subnets, so no tenant reaches, or is reached from,
//! another's addresses, whatever addresses a pod gives itself.

use crate::acl::{bits, mask};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;
use trellis_cni::NetConfList;
use trellis_ebpf_common::{LogicalNet, LOGICAL_PREFIXES};

pub const LOGICAL_ANNOTATION: &str = "trellis.dev/logical-network";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogicalError {
    #[error("{LOGICAL_ANNOTATION}: {0}")]
    Annotation(String),
    #[error("logical network {network} ({subnet}) overlaps logical network {other} ({other_subnet}) on the same physical network ({physical})")]
    Overlap {
        network: String,
        subnet: Subnet,
        other: String,
        other_subnet: Subnet,
        physical: String,
    },
    #[error("the pod's address {addr} is outside logical network {network}'s subnets ({subnets}): its IPAM must hand out addresses from them")]
    Outside {
        addr: IpAddr,
        network: String,
        subnets: String,
    },
}

/// A CIDR without host bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Subnet {
    fn width(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    pub fn parse(s: &str) -> Result<Subnet, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix length)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: not an IPv4 or IPv6 address"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|n| (1..=width).contains(n))
            .ok_or_else(|| format!("{s:?}: prefix length must be 1-{width}"))?;
        if bits(addr) & !mask(prefix, width) != 0 {
            return Err(format!("{s:?}: host bits are set"));
        }
        Ok(Subnet { addr, prefix })
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.addr.is_ipv4()
            && bits(a) & mask(self.prefix, self.width()) == bits(self.addr)
    }

    pub fn overlaps(&self, o: &Subnet) -> bool {
        self.contains(o.addr) || o.contains(self.addr)
    }
}

/// A NAD's logical network: its physical network and its subnets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logical {
    /// `master:eth1`, `bridge:br0`, `sriov:intel.com/pool`.
    pub physical: String,
    pub subnets: Vec<Subnet>,
}

/// The physical network a NAD's config attaches to.
fn physical_of(conf: &NetConfList, resource: Option<&str>) -> Result<String, LogicalError> {
    let first = conf.plugins.first();
    let ty = first
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let field = |k: &str| first.and_then(|p| p.get(k)).and_then(Value::as_str);
    let err = |m: String| LogicalError::Annotation(m);
    match ty {
        "macvlan" | "ipvlan" => field("master")
            .map(|m| format!("master:{m}"))
            .ok_or_else(|| err(format!("a {ty} logical network needs an explicit master"))),
        "bridge" => Ok(format!("bridge:{}", field("bridge").unwrap_or("cni0"))),
        crate::sriov::TYPE => resource.map(|r| format!("sriov:{r}")).ok_or_else(|| {
            err("an sriov logical network needs the NAD's k8s.v1.cni.cncf.io/resourceName".into())
        }),
        other => Err(err(format!(
            "a logical network is carved out of a macvlan, ipvlan, bridge or sriov network, not {other:?}"
        ))),
    }
}

/// The NAD's logical network, if it is one: `{"subnets": ["10.1.0.0/24", ...]}`, at
/// most four per family, not overlapping each other.
pub fn of_nad(
    nad: &crate::nad::NetworkAttachmentDefinition,
    conf: &NetConfList,
) -> Result<Option<Logical>, LogicalError> {
    let Some(text) = nad.metadata.annotations.get(LOGICAL_ANNOTATION) else {
        return Ok(None);
    };
    let err = |m: String| LogicalError::Annotation(m);
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
    let Value::Object(o) = &v else {
        return Err(err(
            "must be a JSON object like {\"subnets\": [\"10.1.0.0/24\"]}".into(),
        ));
    };
    if let Some(k) = o.keys().find(|k| *k != "subnets") {
        return Err(err(format!("unknown field {k:?} (known: subnets)")));
    }
    let list = o
        .get("subnets")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| err("subnets: a non-empty list of CIDRs".into()))?;
    let mut subnets = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let s = s
            .as_str()
            .ok_or_else(|| err(format!("subnets[{i}]: {s} is not a string")))?;
        let n = Subnet::parse(s).map_err(|m| err(format!("subnets[{i}]: {m}")))?;
        if let Some(o) = subnets.iter().find(|o: &&Subnet| o.overlaps(&n)) {
            return Err(err(format!("subnets[{i}]: {n} overlaps {o}")));
        }
        subnets.push(n);
    }
    for v4 in [true, false] {
        if subnets.iter().filter(|s| s.addr.is_ipv4() == v4).count() > LOGICAL_PREFIXES {
            return Err(err(format!(
                "subnets: at most {LOGICAL_PREFIXES} per address family"
            )));
        }
    }
    let resource = nad
        .metadata
        .annotations
        .get(crate::nad::RESOURCE_NAME_ANNOTATION)
        .map(String::as_str);
    Ok(Some(Logical {
        physical: physical_of(conf, resource)?,
        subnets,
    }))
}

/// Fails if `network`'s subnets overlap those of another logical network (`others`:
/// network name and logical network) on the same physical network.
pub fn check_overlap<'a>(
    network: &str,
    l: &Logical,
    others: impl IntoIterator<Item = (&'a str, &'a Logical)>,
) -> Result<(), LogicalError> {
    for (other, o) in others {
        if other == network || o.physical != l.physical {
            continue;
        }
        for s in &l.subnets {
            if let Some(t) = o.subnets.iter().find(|t| t.overlaps(s)) {
                return Err(LogicalError::Overlap {
                    network: network.into(),
                    subnet: *s,
                    other: other.into(),
                    other_subnet: *t,
                    physical: l.physical.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Fails if an address the pod got is outside its logical network's subnets.
pub fn check_addresses(network: &str, l: &Logical, addrs: &[IpAddr]) -> Result<(), LogicalError> {
    match addrs
        .iter()
        .find(|a| !l.subnets.iter().any(|s| s.contains(**a)))
    {
        Some(a) => Err(LogicalError::Outside {
            addr: *a,
            network: network.into(),
            subnets: l
                .subnets
                .iter()
                .map(Subnet::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }),
        None => Ok(()),
    }
}

impl Logical {
    /// As the programs read it (LOGICAL entry).
    pub fn to_map(&self) -> LogicalNet {
        let mut m = LogicalNet::default();
        for s in &self.subnets {
            let w = s.width();
            let (net, mk) = (bits(s.addr), mask(s.prefix, w));
            if s.addr.is_ipv4() {
                m.v4[m.n4 as usize] = [net as u32, mk as u32];
                m.n4 += 1;
            } else {
                m.v6[m.n6 as usize] =
                    [(net >> 64) as u64, net as u64, (mk >> 64) as u64, mk as u64];
                m.n6 += 1;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nad(
        ann: Option<Value>,
        conf: Value,
    ) -> (crate::nad::NetworkAttachmentDefinition, NetConfList) {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(a) = ann {
            annotations.insert(LOGICAL_ANNOTATION.to_string(), a.to_string());
        }
        let n = crate::nad::NetworkAttachmentDefinition {
            api_version: "k8s.cni.cncf.io/v1".into(),
            kind: "NetworkAttachmentDefinition".into(),
            metadata: crate::nad::ObjectMeta {
                name: "lan".into(),
                namespace: Some("tenant-a".into()),
                annotations,
            },
            spec: crate::nad::NadSpec {
                config: conf.to_string(),
            },
        };
        let c = n.conf_list().unwrap();
        (n, c)
    }

    fn mv() -> Value {
        json!({"cniVersion": "1.0.0", "type": "macvlan", "master": "eth1"})
    }

    #[test]
    fn parses_subnets_and_the_physical_network() {
        let (n, c) = nad(
            Some(json!({"subnets": ["10.1.0.0/24", "fd00:1::/64"]})),
            mv(),
        );
        let l = of_nad(&n, &c).unwrap().unwrap();
        assert_eq!(l.physical, "master:eth1");
        assert_eq!(l.subnets.len(), 2);
        let m = l.to_map();
        assert_eq!((m.n4, m.n6), (1, 1));
        assert_eq!(m.v4[0], [0x0a01_0000, 0xffff_ff00]);
        assert_eq!(m.v6[0], [0xfd00_0001_0000_0000, 0, u64::MAX, 0]);
        let (n, c) = nad(None, mv());
        assert_eq!(of_nad(&n, &c).unwrap(), None);
        let br = json!({"cniVersion": "1.0.0", "type": "bridge", "bridge": "br7"});
        let (n, c) = nad(Some(json!({"subnets": ["10.2.0.0/16"]})), br);
        assert_eq!(of_nad(&n, &c).unwrap().unwrap().physical, "bridge:br7");
    }

    #[test]
    fn bad_annotations_are_named() {
        for (ann, says) in [
            (json!([1]), "JSON object"),
            (json!({"subnet": ["10.0.0.0/8"]}), "unknown field"),
            (json!({"subnets": []}), "non-empty"),
            (json!({"subnets": ["10.0.0.1/8"]}), "host bits"),
            (json!({"subnets": ["10.0.0.0/33"]}), "prefix length"),
            (json!({"subnets": ["10.0.0.0/0"]}), "prefix length"),
            (
                json!({"subnets": ["10.0.0.0/8", "10.1.0.0/16"]}),
                "overlaps",
            ),
            (json!({"subnets": [1]}), "not a string"),
            (
                json!({"subnets": ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"]}),
                "at most 4",
            ),
        ] {
            let (n, c) = nad(Some(ann.clone()), mv());
            let e = of_nad(&n, &c).unwrap_err().to_string();
            assert!(
                e.contains(LOGICAL_ANNOTATION) && e.contains(says),
                "{ann}: {e}"
            );
        }
        let host_local = json!({"cniVersion": "1.0.0", "type": "host-device", "device": "eth2"});
        let (n, c) = nad(Some(json!({"subnets": ["10.0.0.0/8"]})), host_local);
        assert!(of_nad(&n, &c)
            .unwrap_err()
            .to_string()
            .contains("carved out of"));
        let no_master = json!({"cniVersion": "1.0.0", "type": "macvlan"});
        let (n, c) = nad(Some(json!({"subnets": ["10.0.0.0/8"]})), no_master);
        assert!(of_nad(&n, &c)
            .unwrap_err()
            .to_string()
            .contains("explicit master"));
    }

    #[test]
    fn overlaps_on_one_physical_network_only() {
        let l = |phys: &str, s: &str| Logical {
            physical: phys.into(),
            subnets: vec![Subnet::parse(s).unwrap()],
        };
        let a = l("master:eth1", "10.1.0.0/24");
        let b = l("master:eth1", "10.1.0.128/25");
        let c = l("master:eth2", "10.1.0.0/24");
        let d = l("master:eth1", "10.2.0.0/24");
        let e = check_overlap("t/a", &a, [("t/b", &b)]).unwrap_err();
        assert!(e.to_string().contains("10.1.0.128/25"), "{e}");
        assert!(check_overlap("t/a", &a, [("t/c", &c), ("t/d", &d), ("t/a", &a)]).is_ok());
    }

    #[test]
    fn addresses_must_be_inside() {
        let l = Logical {
            physical: "bridge:b".into(),
            subnets: vec![Subnet::parse("10.1.0.0/24").unwrap()],
        };
        assert!(check_addresses("t/a", &l, &["10.1.0.9".parse().unwrap()]).is_ok());
        let e = check_addresses("t/a", &l, &["10.2.0.9".parse().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("10.2.0.9"), "{e}");
        assert!(!Subnet::parse("10.1.0.0/24")
            .unwrap()
            .contains("fd00::1".parse().unwrap()));
    }
}
