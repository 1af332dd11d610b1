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
    #[error("logical network {network} ({subnet}) overlaps logical network {other} ({other_subnet}) on the same physical network ({physical}), {which}")]
    Claimed {
        network: String,
        subnet: Subnet,
        other: String,
        other_subnet: Subnet,
        physical: String,
        which: &'static str,
    },
    #[error("{network} attaches to physical network {physical}, which {by} shares out between tenants: every NetworkAttachmentDefinition on it must be a logical network too ({LOGICAL_ANNOTATION}), or its pods could take any tenant's addresses")]
    Reserved {
        network: String,
        physical: String,
        by: String,
    },
    #[error("logical network {network} (on {kind}): a pod that may send raw frames or change its own interfaces could take or watch another tenant's addresses, and {reason}")]
    Privileged {
        network: String,
        kind: String,
        reason: String,
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

/// The physical network a NAD's config attaches to, if it is one logical networks
/// can share (a macvlan, ipvlan or VLAN master, a bridge, an SR-IOV pool): the first
/// plugin of the chain that makes an interface on one.
pub fn physical(conf: &NetConfList, resource: Option<&str>) -> Option<String> {
    physical_of(conf, resource).ok()
}

/// Plugin types whose interface is on a physical network logical networks share.
const WIRED: [&str; 5] = [
    "macvlan",
    "ipvlan",
    "vlan",
    "bridge",
    crate::kinds::sriov::TYPE,
];

/// The physical network a NAD's config attaches to.
fn physical_of(conf: &NetConfList, resource: Option<&str>) -> Result<String, LogicalError> {
    let first = conf.plugins.iter().find(|p| {
        p.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| WIRED.contains(&t))
    });
    let ty = first
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    // An empty name is no name to the plugins (the default-route device, cni0).
    let field = |k: &str| {
        first
            .and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let err = |m: String| LogicalError::Annotation(m);
    match ty {
        "macvlan" | "ipvlan" | "vlan" => field("master")
            .map(|m| format!("master:{m}"))
            .ok_or_else(|| err(format!("a {ty} network on a shared wire needs an explicit master (without one the plugin takes the default-route device)"))),
        "bridge" => Ok(format!("bridge:{}", field("bridge").unwrap_or("cni0"))),
        crate::kinds::sriov::TYPE => resource.map(|r| format!("sriov:{r}")).ok_or_else(|| {
            err("an sriov logical network needs the NAD's k8s.v1.cni.cncf.io/resourceName".into())
        }),
        _ => Err(err(
            "a logical network is carved out of a macvlan, ipvlan, bridge or sriov network (no plugin of its chain makes one)".into(),
        )),
    }
}

/// Whether the config has a plugin on a physical network that logical networks
/// share whose physical network cannot be told (a macvlan without a master, an
/// sriov network without the NAD's resourceName).
pub fn wired_unknown(conf: &NetConfList, resource: Option<&str>) -> bool {
    conf.plugins.iter().any(|p| {
        p.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| WIRED.contains(&t))
    }) && physical_of(conf, resource).is_err()
}

/// Whether a plugin of the config puts a macvlan or ipvlan master inside the pod
/// (`linkInContainer`, CNI plugins >= 1.3), in any spelling.
pub fn link_in_container(conf: &NetConfList) -> bool {
    conf.plugins
        .iter()
        .any(|p| p.keys().any(|k| k.eq_ignore_ascii_case("linkInContainer")))
}

/// `physical` as this node sees it: a master or bridge named by an altname, or a
/// macvlan or ipvlan device stacked on another, is the device at the bottom (`root`
/// gives it and whether it is a bridge; a macvlan on a bridge is on the bridge's
/// wire). A device this node does not have keeps its name; pools are kept as they
/// are. Running it again on its answer gives the same answer.
pub fn canonical<E>(
    physical: &str,
    root: impl Fn(&str) -> Result<Option<(String, bool)>, E>,
) -> Result<String, E> {
    let Some((kind, name)) = physical.split_once(':') else {
        return Ok(physical.to_string());
    };
    if kind != "master" && kind != "bridge" {
        return Ok(physical.to_string());
    }
    Ok(match root(name)? {
        Some((r, true)) => format!("bridge:{r}"),
        Some((r, false)) => format!("master:{r}"),
        None => physical.to_string(),
    })
}

/// Whether `w` names a physical network as `logical_physical_networks` takes it.
pub fn check_wire_name(w: &str) -> Result<(), String> {
    match w.split_once(':') {
        Some(("master" | "bridge" | "sriov", name)) if !name.is_empty() => Ok(()),
        _ => Err(format!(
            "{w:?} is not master:DEVICE, bridge:BRIDGE or sriov:RESOURCE"
        )),
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
    let physical = physical_of(conf, resource)?;
    let made_by = conf.plugins.iter().find_map(|p| {
        p.get("type")
            .and_then(Value::as_str)
            .filter(|t| WIRED.contains(t))
    });
    if made_by == Some("vlan") {
        return Err(err(
            "a logical network is carved out of a macvlan, ipvlan, bridge or sriov network, not a vlan one".into(),
        ));
    }
    Ok(Some(Logical { physical, subnets }))
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

/// A logical NAD of the cluster, for `check_cluster`.
pub struct Carving {
    /// `namespace/name`.
    pub network: String,
    /// Its creationTimestamp (RFC 3339, UTC: ordered as text).
    pub created: Option<String>,
    pub logical: Logical,
}

impl Carving {
    /// Whether this carving came before `o`; None: that cannot be told (a creation
    /// time missing, or both in the same second, where a name an attacker picks
    /// would decide).
    fn before(&self, o: &Carving) -> Option<bool> {
        match (&self.created, &o.created) {
            (Some(a), Some(b)) if a != b => Some(a < b),
            _ => None,
        }
    }
}

/// Checks a NAD about to be used against the cluster's logical NADs (`cluster`): a
/// NAD that is no logical network (`me` with no subnets) may not share a physical
/// network with one, and a logical one may not overlap one that was carved first.
/// Without both creation times, overlapping carvings both fail.
pub fn check_cluster(me: &Carving, cluster: &[Carving]) -> Result<(), LogicalError> {
    let physical = &me.logical.physical;
    let is_logical = !me.logical.subnets.is_empty();
    for o in cluster
        .iter()
        .filter(|o| o.network != me.network && &o.logical.physical == physical)
    {
        if !is_logical {
            return Err(LogicalError::Reserved {
                network: me.network.clone(),
                physical: physical.clone(),
                by: format!("logical network {}", o.network),
            });
        }
        for s in &me.logical.subnets {
            let Some(t) = o.logical.subnets.iter().find(|t| t.overlaps(s)) else {
                continue;
            };
            let which = match me.before(o) {
                Some(true) => continue,
                Some(false) => "which was created first",
                None => "and without creation times that tell which came first neither may be used",
            };
            return Err(LogicalError::Claimed {
                network: me.network.clone(),
                subnet: *s,
                other: o.network.clone(),
                other_subnet: *t,
                physical: physical.clone(),
                which,
            });
        }
    }
    Ok(())
}

/// Capabilities a container may add and still join a logical network: the
/// runtimes' defaults without NET_RAW (which lets a pod send past its egress check
/// with AF_PACKET and PACKET_QDISC_BYPASS, or read the wire's other frames). Every
/// other one (NET_ADMIN removes the check; SYS_ADMIN, SYS_MODULE, BPF, ... do
/// worse) is refused.
const HARMLESS_CAPS: [&str; 12] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
];

/// Why a pod of `spec` may send raw frames, change its interfaces or reach the
/// node's processes, if it may: the host's PID namespace, a privileged container,
/// one adding a capability beyond the runtimes' harmless defaults, or one not
/// dropping NET_RAW (containerd grants it by default). Capability names are read
/// as the runtimes read them (upper-cased; a "CAP_" prefix is not stripped by them,
/// so a drop of "CAP_NET_RAW" drops nothing).
pub fn raw_access(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    if spec.host_pid == Some(true) {
        return Some("the pod shares the host's PID namespace (hostPID)".into());
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| (c.name.as_str(), c.security_context.as_ref()))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| (c.name.as_str(), c.security_context.as_ref())),
        );
    for (name, sc) in containers {
        let sc = sc.cloned().unwrap_or_default();
        if sc.privileged == Some(true) {
            return Some(format!("container {name:?} is privileged"));
        }
        let caps = sc.capabilities.unwrap_or_default();
        let upper = |l: Option<Vec<String>>| -> Vec<String> {
            l.unwrap_or_default()
                .iter()
                .map(|c| c.to_ascii_uppercase())
                .collect()
        };
        let (add, drop) = (upper(caps.add), upper(caps.drop));
        if let Some(c) = add.iter().find(|c| !HARMLESS_CAPS.contains(&c.as_str())) {
            return Some(format!(
                "container {name:?} adds capability {c} (only {} may be added)",
                HARMLESS_CAPS.join(", ")
            ));
        }
        if !drop.iter().any(|c| c == "ALL" || c == "NET_RAW") {
            return Some(format!(
                "container {name:?} does not drop capability NET_RAW (securityContext.capabilities.drop: [\"NET_RAW\"] or [\"ALL\"]; container runtimes grant it by default)"
            ));
        }
    }
    None
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
                ..Default::default()
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

    fn carving(net: &str, created: Option<&str>, phys: &str, subnets: &[&str]) -> Carving {
        Carving {
            network: net.into(),
            created: created.map(Into::into),
            logical: Logical {
                physical: phys.into(),
                subnets: subnets.iter().map(|s| Subnet::parse(s).unwrap()).collect(),
            },
        }
    }

    #[test]
    fn the_first_carving_wins_and_plain_nads_stay_off_shared_wires() {
        let t1 = Some("2026-12-01T10:00:00Z");
        let t2 = Some("2026-12-02T10:00:00Z");
        let a = carving("ta/lan", t1, "master:eth1", &["10.1.0.0/24"]);
        let b = carving("tb/lan", t2, "master:eth1", &["10.1.0.128/25"]);
        let other_wire = carving("tc/lan", t1, "master:eth2", &["10.1.0.0/24"]);
        let cluster = [a, b, other_wire];
        // The older keeps its carving; the newer is refused, naming both.
        assert!(check_cluster(&cluster[0], &cluster).is_ok());
        let e = check_cluster(&cluster[1], &cluster)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ta/lan") && e.contains("created first"), "{e}");
        // Without a creation time, neither.
        let c = carving("tc/x", None, "master:eth1", &["10.1.0.0/25"]);
        let e = check_cluster(&c, &cluster).unwrap_err().to_string();
        assert!(e.contains("neither"), "{e}");
        // The same second: neither (a name would decide, and names are chosen).
        let d = carving("aa/x", t2, "master:eth1", &["10.1.0.192/26"]);
        assert!(check_cluster(&d, &cluster[1..2]).is_err());
        // Apart, on one wire: fine.
        let e2 = carving("td/lan", t2, "master:eth1", &["10.2.0.0/24"]);
        assert!(check_cluster(&e2, &cluster).is_ok());
        // A NAD that is no logical network on a shared wire is refused; elsewhere not.
        let plain = carving("tx/plain", t2, "master:eth1", &[]);
        let e = check_cluster(&plain, &cluster).unwrap_err().to_string();
        assert!(
            e.contains(LOGICAL_ANNOTATION) && e.contains("master:eth1"),
            "{e}"
        );
        let plain = carving("tx/plain", t2, "master:eth9", &[]);
        assert!(check_cluster(&plain, &cluster).is_ok());
    }

    fn spec(containers: Value) -> k8s_openapi::api::core::v1::PodSpec {
        serde_json::from_value(json!({ "containers": containers })).unwrap()
    }

    #[test]
    fn raw_network_access_is_found_in_every_container() {
        let safe = json!({"capabilities": {"drop": ["ALL"]}});
        let drop_raw = json!({"capabilities": {"drop": ["net_raw"]}});
        assert_eq!(
            raw_access(&spec(json!([
                {"name": "a", "securityContext": safe},
                {"name": "b", "securityContext": drop_raw}
            ]))),
            None
        );
        for (sc, says) in [
            (json!(null), "does not drop"),
            (
                json!({"capabilities": {"drop": ["CAP_NET_RAW"]}}),
                "does not drop",
            ),
            (
                json!({"privileged": true, "capabilities": {"drop": ["ALL"]}}),
                "privileged",
            ),
            (
                json!({"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}),
                "NET_ADMIN",
            ),
            (
                json!({"capabilities": {"add": ["cap_net_raw"], "drop": ["ALL"]}}),
                "CAP_NET_RAW",
            ),
            (
                json!({"capabilities": {"add": ["all"], "drop": ["ALL"]}}),
                "ALL",
            ),
            (
                json!({"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}),
                "SYS_ADMIN",
            ),
        ] {
            let mut c = json!({"name": "b"});
            if !sc.is_null() {
                c["securityContext"] = sc.clone();
            }
            let r = raw_access(&spec(json!([{"name": "a", "securityContext": safe}, c])));
            let r = r.unwrap_or_else(|| panic!("{sc}: not found"));
            assert!(r.contains("\"b\"") && r.contains(says), "{sc}: {r}");
        }
        // The host's PID namespace, and capabilities beyond the runtimes' defaults.
        let mut s = spec(json!([{"name": "a", "securityContext": safe}]));
        s.host_pid = Some(true);
        assert!(raw_access(&s).unwrap().contains("hostPID"));
        let bpf = json!({"capabilities": {"add": ["BPF"], "drop": ["ALL"]}});
        assert!(
            raw_access(&spec(json!([{"name": "a", "securityContext": bpf}])))
                .unwrap()
                .contains("BPF")
        );
        let bind = json!({"capabilities": {"add": ["net_bind_service"], "drop": ["ALL"]}});
        assert_eq!(
            raw_access(&spec(json!([{"name": "a", "securityContext": bind}]))),
            None
        );
        // Init containers count as much.
        let mut s = spec(json!([{"name": "a", "securityContext": safe}]));
        s.init_containers = Some(vec![
            serde_json::from_value(json!({"name": "init"})).unwrap()
        ]);
        assert!(raw_access(&s).unwrap().contains("init"));
    }

    #[test]
    fn names_resolve_to_the_device_at_the_bottom() {
        let root = |n: &str| -> Result<_, ()> {
            Ok(match n {
                "alt0" | "eth1" => Some(("eth1".to_string(), false)),
                "mv0" => Some(("eth1".to_string(), false)),
                "br0" | "mvb" => Some(("br0".to_string(), true)),
                _ => None,
            })
        };
        let c = |p: &str| canonical(p, root).unwrap();
        assert_eq!(c("master:alt0"), "master:eth1");
        assert_eq!(c("master:mv0"), "master:eth1");
        assert_eq!(c("master:mvb"), "bridge:br0");
        assert_eq!(c("bridge:br0"), "bridge:br0");
        assert_eq!(c("master:gone"), "master:gone");
        assert_eq!(c("sriov:intel.com/a"), "sriov:intel.com/a");
        assert!(canonical("master:x", |_| Err::<Option<(String, bool)>, _>(())).is_err());
        assert!(check_wire_name("master:eth1").is_ok());
        assert!(check_wire_name("eth1").is_err() && check_wire_name("macvlan:eth1").is_err());
        // The chain's first plugin that makes an interface names the wire.
        let chain: NetConfList = NetConfList::parse(
            json!({"cniVersion": "1.0.0", "name": "x", "plugins": [
                {"type": "static"},
                {"type": "macvlan", "master": "eth1"}
            ]})
            .to_string()
            .as_bytes(),
            None,
        )
        .unwrap();
        assert_eq!(physical(&chain, None).as_deref(), Some("master:eth1"));
        let no_master: NetConfList = NetConfList::parse(
            json!({"cniVersion": "1.0.0", "name": "x", "type": "ipvlan"})
                .to_string()
                .as_bytes(),
            None,
        )
        .unwrap();
        assert!(wired_unknown(&no_master, None));
        let empty_master: NetConfList = NetConfList::parse(
            json!({"cniVersion": "1.0.0", "name": "x", "type": "macvlan", "master": ""})
                .to_string()
                .as_bytes(),
            None,
        )
        .unwrap();
        assert_eq!(physical(&empty_master, None), None);
        assert!(wired_unknown(&empty_master, None));
    }
}
