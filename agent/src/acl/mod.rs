//! Per-network ACLs: the `trellis.dev/acl` NAD annotation, checked rule by rule, and
//! compiled into the interval tables the tc programs search.
//!
//! Semantics: for a packet, the remote address (source of what comes in, destination
//! of what goes out) is matched against the CIDRs of the rules for that direction; the
//! most specific CIDR that contains it wins, as in a routing table. Among that CIDR's
//! rules, the first in the NAD's order whose protocol and destination port match
//! decides. Nothing matching: the default action.

mod compile;

pub use compile::{Index, Table};

use serde::Deserialize;
use std::net::IpAddr;
use trellis_ebpf_common::{
    AclRule, Bucket, Span, ACL_INDEX_MAX_BITS, ACL_INTERVALS, ACT_ALLOW, ACT_DENY, DIR_EGRESS,
    DIR_INGRESS, MAX_ACL_RULES, MAX_RULES_PER_CIDR, PROTO_ANY,
};

pub const ACL_ANNOTATION: &str = "trellis.dev/acl";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("annotation {ACL_ANNOTATION}: not valid JSON for an ACL: {0}")]
    Json(String),
    #[error("annotation {ACL_ANNOTATION}: default {0:?}: must be \"allow\" or \"deny\"")]
    Default(String),
    #[error("annotation {ACL_ANNOTATION}: rule {index}: {message}")]
    Rule { index: usize, message: String },
    #[error("annotation {ACL_ANNOTATION}: {count} rules; at most {MAX_ACL_RULES} fit")]
    TooMany { count: usize },
}

/// The annotation as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AclSpec {
    #[serde(default = "allow")]
    default: String,
    #[serde(default)]
    rules: Vec<serde_json::Value>,
}

fn allow() -> String {
    "allow".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    action: String,
    cidr: String,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    ports: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
    Both,
}

impl Direction {
    fn applies(self, dir: u32) -> bool {
        match self {
            Direction::Both => true,
            Direction::Ingress => dir == DIR_INGRESS,
            Direction::Egress => dir == DIR_EGRESS,
        }
    }
}

/// One checked rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub deny: bool,
    pub direction: Direction,
    pub addr: IpAddr,
    pub prefix: u8,
    /// IP protocol number; 0 = any.
    pub proto: u8,
    /// Destination port range; None = any.
    pub ports: Option<(u16, u16)>,
}

/// A network's checked ACL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    pub default_deny: bool,
    pub rules: Vec<Rule>,
}

fn rule_err(index: usize, message: impl Into<String>) -> AclError {
    AclError::Rule {
        index,
        message: message.into(),
    }
}

fn parse_cidr(index: usize, s: &str) -> Result<(IpAddr, u8), AclError> {
    let bad = |why: &str| rule_err(index, format!("cidr {s:?}: {why}"));
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| bad("not a CIDR (address/prefix length)"))?;
    let addr: IpAddr = a.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| bad(&format!("prefix length must be 0-{max}")))?;
    let host = bits(addr) & !mask(prefix, max);
    if host != 0 {
        let net = from_bits(bits(addr) & mask(prefix, max), addr.is_ipv4());
        return Err(bad(&format!(
            "host bits are set (the network is {net}/{prefix})"
        )));
    }
    Ok((addr, prefix))
}

pub(crate) fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_bits(b: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((b as u32).into())
    } else {
        IpAddr::V6(b.into())
    }
}

/// The network mask of a prefix length in an address space of `max` bits.
/// The network mask of `prefix` bits in an address of `max` bits.
pub(crate) fn mask(prefix: u8, max: u8) -> u128 {
    let all: u128 = if max == 128 {
        u128::MAX
    } else {
        (1u128 << max) - 1
    };
    if prefix == 0 {
        0
    } else {
        all & !((1u128 << (max - prefix)) - 1)
    }
}

fn parse_proto(index: usize, s: &str, v4: bool) -> Result<u8, AclError> {
    let p = match s.to_ascii_lowercase().as_str() {
        "any" => PROTO_ANY,
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        "icmpv6" => 58,
        _ => {
            return Err(rule_err(
                index,
                format!("protocol {s:?}: must be tcp, udp, sctp, icmp, icmpv6 or any"),
            ))
        }
    };
    if (p == 1 && !v4) || (p == 58 && v4) {
        return Err(rule_err(
            index,
            format!(
                "protocol {s:?} does not go with an IPv{} cidr",
                if v4 { 4 } else { 6 }
            ),
        ));
    }
    Ok(p)
}

fn parse_ports(index: usize, v: &serde_json::Value) -> Result<(u16, u16), AclError> {
    let bad = || {
        rule_err(
            index,
            format!("ports {v}: must be a port (1-65535) or a range \"low-high\""),
        )
    };
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
    let (lo, hi) = match v {
        serde_json::Value::Number(n) => {
            let p = n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(bad)?;
            (p, p)
        }
        serde_json::Value::String(s) => match s.split_once('-') {
            Some((a, b)) => (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?),
            None => {
                let p = port(s).ok_or_else(bad)?;
                (p, p)
            }
        },
        _ => return Err(bad()),
    };
    if lo > hi {
        return Err(rule_err(
            index,
            format!("ports {v}: the range is backwards ({lo} > {hi})"),
        ));
    }
    Ok((lo, hi))
}

fn parse_rule(index: usize, v: serde_json::Value) -> Result<Rule, AclError> {
    let spec: RuleSpec = serde_json::from_value(v).map_err(|e| rule_err(index, e.to_string()))?;
    let deny = match spec.action.to_ascii_lowercase().as_str() {
        "allow" => false,
        "deny" => true,
        _ => {
            return Err(rule_err(
                index,
                format!("action {:?}: must be \"allow\" or \"deny\"", spec.action),
            ))
        }
    };
    let direction = match spec.direction.as_deref().map(str::to_ascii_lowercase) {
        None => Direction::Both,
        Some(d) if d == "both" => Direction::Both,
        Some(d) if d == "ingress" => Direction::Ingress,
        Some(d) if d == "egress" => Direction::Egress,
        Some(d) => {
            return Err(rule_err(
                index,
                format!("direction {d:?}: must be ingress, egress or both"),
            ))
        }
    };
    let (addr, prefix) = parse_cidr(index, &spec.cidr)?;
    let proto = match &spec.protocol {
        Some(p) => parse_proto(index, p, addr.is_ipv4())?,
        None => PROTO_ANY,
    };
    let ports = match &spec.ports {
        None => None,
        Some(v) => {
            if !matches!(proto, 6 | 17 | 132) {
                return Err(rule_err(
                    index,
                    format!(
                        "ports {v} need protocol tcp, udp or sctp (protocol is {})",
                        spec.protocol.as_deref().unwrap_or("any")
                    ),
                ));
            }
            Some(parse_ports(index, v)?)
        }
    };
    Ok(Rule {
        deny,
        direction,
        addr,
        prefix,
        proto,
        ports,
    })
}

impl Acl {
    /// Parses and checks the annotation's value; errors name the rule (0-based, in
    /// the NAD's order) and what is wrong with it.
    pub fn parse(s: &str) -> Result<Acl, AclError> {
        let spec: AclSpec = serde_json::from_str(s).map_err(|e| AclError::Json(e.to_string()))?;
        let default_deny = match spec.default.to_ascii_lowercase().as_str() {
            "allow" => false,
            "deny" => true,
            _ => return Err(AclError::Default(spec.default)),
        };
        if spec.rules.len() > MAX_ACL_RULES as usize {
            return Err(AclError::TooMany {
                count: spec.rules.len(),
            });
        }
        let rules = spec
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_rule(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        let acl = Acl {
            default_deny,
            rules,
        };
        // Per-CIDR limits are checked here, so a NAD that cannot be compiled fails
        // when it is read, before anything is attached.
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for v4 in [true, false] {
                acl.prefixes(dir, v4)?;
            }
        }
        Ok(acl)
    }

    /// A stable digest of the rules: changes when the NAD's ACL does.
    pub fn digest(&self) -> u64 {
        // FNV-1a over the checked rules' debug form: the same ACL gives the same
        // digest in every agent process (it is kept in a pinned map across restarts).
        let mut h: u64 = 0xcbf29ce484222325;
        for b in format!("{self:?}").bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }

    pub fn default_action(&self) -> u32 {
        (if self.default_deny {
            ACT_DENY
        } else {
            ACT_ALLOW
        }) as u32
    }

    /// What the rules say about a packet, straight from the definition (no tables):
    /// `Some(rule index)` or None for the default. The reference the tests hold the
    /// compiled tables and the kernel programs to.
    pub fn decide(&self, dir: u32, remote: IpAddr, proto: u8, dport: Option<u16>) -> Option<usize> {
        let max = if remote.is_ipv4() { 32 } else { 128 };
        let a = bits(remote);
        let best = self
            .rules
            .iter()
            .filter(|r| {
                r.addr.is_ipv4() == remote.is_ipv4()
                    && r.direction.applies(dir)
                    && a & mask(r.prefix, max) == bits(r.addr)
            })
            .map(|r| r.prefix)
            .max()?;
        self.rules.iter().position(|r| {
            r.addr.is_ipv4() == remote.is_ipv4()
                && r.direction.applies(dir)
                && r.prefix == best
                && a & mask(r.prefix, max) == bits(r.addr)
                && (r.proto == PROTO_ANY || r.proto == proto)
                && match r.ports {
                    None => true,
                    Some((lo, hi)) => dport.is_some_and(|d| d >= lo && d <= hi),
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks a packet up in compiled intervals the way the programs do (binary search for
    /// the last start <= address, then the span's first matching rule).
    fn lookup(
        intervals: &[(u128, Span)],
        rules: &[AclRule],
        addr: u128,
        proto: u8,
        dport: Option<u16>,
    ) -> Option<usize> {
        let i = intervals.partition_point(|(s, _)| *s <= addr) - 1;
        let span = intervals[i].1;
        rules[span.first as usize..(span.first + span.count) as usize]
            .iter()
            .find(|r| {
                (r.proto == PROTO_ANY || r.proto == proto)
                    && (r.port_hi == 0 || dport.is_some_and(|d| d >= r.port_lo && d <= r.port_hi))
            })
            .map(|r| r.id as usize)
    }

    /// Looks an address up the way the programs do: its bucket, then a binary search
    /// of the bucket's intervals (the steps it took, too).
    pub(crate) fn lookup_indexed(t: &Table, x: &Index, addr: u128) -> (usize, u32) {
        if addr < x.lo {
            return (0, 0);
        }
        let last = 1u128 << x.bits;
        let b = ((addr - x.lo) >> x.shift).min(last) as usize;
        let bucket = x.buckets[b];
        let (mut lo, mut size, mut steps) = (bucket.first, bucket.last - bucket.first + 1, 0);
        while size > 1 {
            let half = size / 2;
            if t.intervals[(lo + half) as usize].0 <= addr {
                lo += half;
            }
            size -= half;
            steps += 1;
        }
        assert!(
            steps <= trellis_ebpf_common::ACL_SEARCH_STEPS,
            "within the programs' bound"
        );
        (lo as usize, steps)
    }

    /// `n` deny rules on adjacent IPv4 /24s from 10.0.0.0/24.
    fn adjacent_24s(n: u32) -> String {
        let rules: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"action":"deny","cidr":"10.{}.{}.0/24"}}"#,
                    i / 256,
                    i % 256
                )
            })
            .collect();
        format!(r#"{{"rules":[{}]}}"#, rules.join(","))
    }

    fn acl(s: &str) -> Acl {
        Acl::parse(s).unwrap()
    }

    #[test]
    fn map_layouts_have_no_padding() {
        use std::mem::size_of;
        use trellis_ebpf_common::{AclHeader, IntervalV4, IntervalV6, TableRef};
        assert_eq!(size_of::<IntervalV4>(), 8);
        assert_eq!(size_of::<IntervalV6>(), 24);
        assert_eq!(size_of::<AclRule>(), 8);
        assert_eq!(size_of::<TableRef>(), 48);
        assert_eq!(size_of::<AclHeader>(), 4 * 48 + 16);
    }

    #[test]
    fn bad_rules_are_named() {
        let cases = [
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/33"}]}"#,
                "rule 0: cidr \"10.0.0.0/33\": prefix length must be 0-32",
            ),
            (
                r#"{"rules":[{"action":"allow","cidr":"0.0.0.0/0"},{"action":"deny","cidr":"10.1.2.3/8"}]}"#,
                "rule 1: cidr \"10.1.2.3/8\": host bits are set (the network is 10.0.0.0/8)",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"banana/8"}]}"#,
                "rule 0: cidr \"banana/8\": not an IPv4 or IPv6 address",
            ),
            (
                r#"{"rules":[{"action":"drop","cidr":"10.0.0.0/8"}]}"#,
                "rule 0: action \"drop\": must be \"allow\" or \"deny\"",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","protocol":"gre"}]}"#,
                "rule 0: protocol \"gre\": must be tcp, udp, sctp, icmp, icmpv6 or any",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"fd00::/8","protocol":"icmp"}]}"#,
                "rule 0: protocol \"icmp\" does not go with an IPv6 cidr",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","protocol":"tcp","ports":"90-80"}]}"#,
                "rule 0: ports \"90-80\": the range is backwards (90 > 80)",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","protocol":"tcp","ports":"0"}]}"#,
                "rule 0: ports \"0\": must be a port (1-65535) or a range \"low-high\"",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","protocol":"tcp","ports":70000}]}"#,
                "rule 0: ports 70000: must be a port (1-65535) or a range \"low-high\"",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","ports":"80"}]}"#,
                "rule 0: ports \"80\" need protocol tcp, udp or sctp (protocol is any)",
            ),
            (
                r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","direction":"sideways"}]}"#,
                "rule 0: direction \"sideways\": must be ingress, egress or both",
            ),
            (
                r#"{"default":"maybe"}"#,
                "default \"maybe\": must be \"allow\" or \"deny\"",
            ),
        ];
        for (input, want) in cases {
            let e = Acl::parse(input).unwrap_err().to_string();
            assert!(e.ends_with(want), "{input}: {e}");
            assert!(e.starts_with("annotation trellis.dev/acl: "), "{e}");
        }
        let e = Acl::parse(r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8","port":"80"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule 0: unknown field `port`"), "{e}");
        let e = Acl::parse(&adjacent_24s(MAX_ACL_RULES + 1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "annotation trellis.dev/acl: 10001 rules; at most 10000 fit"
        );
        let same: Vec<String> = (0..=MAX_RULES_PER_CIDR)
            .map(|i| {
                format!(
                    r#"{{"action":"allow","cidr":"10.0.0.0/8","protocol":"tcp","ports":{}}}"#,
                    i + 1
                )
            })
            .collect();
        let e = Acl::parse(&format!(r#"{{"rules":[{}]}}"#, same.join(",")))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("rule 32: more than 32 rules on 10.0.0.0/8 for ingress"),
            "{e}"
        );
    }

    #[test]
    fn most_specific_cidr_then_first_rule() {
        let a = acl(r#"{"default":"deny","rules":[
            {"action":"allow","cidr":"10.0.0.0/8"},
            {"action":"deny","cidr":"10.1.0.0/16","protocol":"tcp","ports":"22"},
            {"action":"allow","cidr":"10.1.0.0/16","protocol":"tcp"},
            {"action":"deny","cidr":"10.1.2.3/32","direction":"egress"},
            {"action":"allow","cidr":"fd00::/64","protocol":"icmpv6"}]}"#);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // /8 only.
        assert_eq!(a.decide(DIR_INGRESS, ip("10.2.0.1"), 17, Some(53)), Some(0));
        // /16 wins; port 22 denied, other tcp allowed, udp matches no /16 rule: default.
        assert_eq!(a.decide(DIR_INGRESS, ip("10.1.9.9"), 6, Some(22)), Some(1));
        assert_eq!(a.decide(DIR_INGRESS, ip("10.1.9.9"), 6, Some(80)), Some(2));
        assert_eq!(a.decide(DIR_INGRESS, ip("10.1.9.9"), 17, Some(80)), None);
        // The /32 is egress-only.
        assert_eq!(a.decide(DIR_EGRESS, ip("10.1.2.3"), 6, Some(80)), Some(3));
        assert_eq!(a.decide(DIR_INGRESS, ip("10.1.2.3"), 6, Some(80)), Some(2));
        assert_eq!(a.decide(DIR_INGRESS, ip("11.0.0.1"), 6, Some(80)), None);
        assert_eq!(a.decide(DIR_INGRESS, ip("fd00::1"), 58, None), Some(4));
        assert_eq!(a.decide(DIR_INGRESS, ip("fd00:0:0:1::1"), 58, None), None);
    }

    /// A small deterministic generator (no rand dependency for one test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
    }

    /// Random nested ACLs: the compiled intervals answer exactly as the definition.
    #[test]
    fn compiled_tables_agree_with_the_definition() {
        let mut g = Lcg(7);
        for round in 0..40 {
            let v4 = round % 2 == 0;
            let mut rules = Vec::new();
            for _ in 0..(1 + g.next() % 60) {
                let max = if v4 { 32 } else { 128 };
                // Few distinct high bits so prefixes nest often.
                let prefix = (g.next() % (max as u64 + 1)) as u8;
                let raw: u128 = if v4 {
                    ((g.next() % 4) << 30 | (g.next() & 0x3fff_ffff)) as u128
                } else {
                    ((g.next() as u128 % 4) << 126) | (g.next() as u128) << 64 | g.next() as u128
                };
                let addr = from_bits(raw & mask(prefix, max), v4);
                let proto = [0u8, 6, 17][(g.next() % 3) as usize];
                let ports = if proto != 0 && g.next().is_multiple_of(2) {
                    let lo = (g.next() % 100) as u16 + 1;
                    Some((lo, lo + (g.next() % 20) as u16))
                } else {
                    None
                };
                let dirs = ["ingress", "egress", "both"];
                rules.push(serde_json::json!({
                    "action": if g.next().is_multiple_of(2) { "allow" } else { "deny" },
                    "cidr": format!("{addr}/{prefix}"),
                    "direction": dirs[(g.next() % 3) as usize],
                    "protocol": match proto { 6 => "tcp", 17 => "udp", _ => "any" },
                    "ports": ports.map(|(l, h)| format!("{l}-{h}")),
                }));
            }
            for r in &mut rules {
                if r["ports"].is_null() {
                    r.as_object_mut().unwrap().remove("ports");
                }
            }
            let a = acl(&serde_json::json!({ "rules": rules }).to_string());
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                let (iv, compiled) = a.intervals(dir, v4);
                assert!(iv.windows(2).all(|w| w[0].0 < w[1].0));
                assert!(iv.len() <= 2 * a.rules.len() + 1);
                // Probe every interval edge and random addresses.
                let mut probes: Vec<u128> = iv
                    .iter()
                    .flat_map(|(s, _)| [*s, s.saturating_sub(1)])
                    .collect();
                for r in &a.rules {
                    let max = if v4 { 32 } else { 128 };
                    let b = bits(r.addr);
                    probes.push(b);
                    probes.push(b | !mask(r.prefix, max) & mask(max, max));
                }
                for _ in 0..200 {
                    probes.push(if v4 {
                        (g.next() as u32) as u128
                    } else {
                        (g.next() as u128) << 64 | g.next() as u128
                    });
                }
                let table = Table {
                    intervals: iv.clone(),
                    rules: compiled.clone(),
                };
                let index = table.index(if v4 { 32 } else { 128 });
                assert!(index.buckets.len() <= iv.len().max(2));
                for addr in probes {
                    assert_eq!(
                        lookup_indexed(&table, &index, addr).0,
                        iv.partition_point(|(s, _)| *s <= addr) - 1,
                        "round {round} dir {dir}: indexed lookup of {addr:#x}"
                    );
                    for (proto, dport) in [(6, Some(5)), (6, Some(50)), (17, Some(110)), (1, None)]
                    {
                        let remote = from_bits(addr, v4);
                        assert_eq!(
                            lookup(&iv, &compiled, addr, proto, dport),
                            a.decide(dir, remote, proto, dport),
                            "round {round} dir {dir} {remote} proto {proto} port {dport:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn ten_thousand_rules_fit_one_table() {
        let a = acl(&adjacent_24s(MAX_ACL_RULES));
        let [t, ..] = a.tables();
        assert!(t.intervals.len() <= ACL_INTERVALS);
        assert_eq!(
            t.intervals[1].0,
            u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) as u128
        );
        assert_eq!(t.rules.len(), MAX_ACL_RULES as usize);
        // The index leaves at most one search step for any of its addresses.
        let x = t.index(32);
        let worst = t
            .intervals
            .iter()
            .flat_map(|(s, _)| [*s, s.saturating_sub(1), s + 1])
            .map(|a| lookup_indexed(&t, &x, a.min(u32::MAX as u128)).1)
            .max();
        assert!(worst <= Some(2), "{worst:?} steps");
    }

    #[test]
    fn one_interval_and_ipv6_tables_index() {
        // No rules on a direction: one interval, every address in it.
        let a = acl(
            r#"{"rules": [{"action": "deny", "cidr": "fd00:20::/48", "direction": "ingress"}]}"#,
        );
        let [_, _, v6_in, v6_out] = a.tables();
        let x = v6_out.index(128);
        assert_eq!(lookup_indexed(&v6_out, &x, u128::MAX).0, 0);
        assert_eq!(lookup_indexed(&v6_out, &x, 0).0, 0);
        let x = v6_in.index(128);
        let net: u128 = "fd00:20::".parse::<std::net::Ipv6Addr>().unwrap().into();
        for (addr, want) in [
            (net - 1, 0),
            (net, 1),
            (net + (1 << 80) - 1, 1),
            (net + (1 << 80), 2),
            (u128::MAX, 2),
        ] {
            assert_eq!(lookup_indexed(&v6_in, &x, addr).0, want, "{addr:#x}");
        }
    }
}
