//! The `trellis.dev/network-choice` pod annotation: for an interface, one network out
//! of candidates, chosen by a policy, and when to move to another. Untrusted: every
//! field is checked and a bad one named.

use crate::selection::{self, NetworkSelection};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

pub const CHOICE_ANNOTATION: &str = "trellis.dev/network-choice";
/// On a NAD: the network's capacity on a node, in bits per second (`least-utilized`
/// divides the measured rate by it).
pub const CAPACITY_ANNOTATION: &str = "trellis.dev/capacity";
/// On a NAD: what using the network costs, a number >= 0 (`cheapest`).
pub const COST_ANNOTATION: &str = "trellis.dev/cost";

/// Choices per pod and candidates per choice: more is no real use and costs NAD
/// reads on every ADD.
const MAX_CHOICES: usize = 8;
const MAX_CANDIDATES: usize = 16;
/// The dwell time's bounds.
const MIN_DWELL: Duration = Duration::from_secs(1);
const MAX_DWELL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {CHOICE_ANNOTATION}{at}: {msg}")]
pub struct ChoiceError {
    at: String,
    msg: String,
}

fn err(at: impl Into<String>, msg: impl Into<String>) -> ChoiceError {
    ChoiceError {
        at: at.into(),
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Lowest measured bytes/s on this node relative to the NAD's capacity.
    LeastUtilized,
    /// Most addresses left in the NAD's IPAM ranges (host-local).
    MostFreeAddresses,
    /// Most devices left in the NAD's resource pool.
    MostFreeDevices,
    /// Lowest `trellis.dev/cost`, ties broken by least utilized.
    Cheapest,
}

impl Policy {
    pub const NAMES: &'static str =
        "least-utilized, most-free-addresses, most-free-devices, cheapest";

    fn parse(s: &str) -> Option<Policy> {
        Some(match s {
            "least-utilized" => Policy::LeastUtilized,
            "most-free-addresses" => Policy::MostFreeAddresses,
            "most-free-devices" => Policy::MostFreeDevices,
            "cheapest" => Policy::Cheapest,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastUtilized => "least-utilized",
            Policy::MostFreeAddresses => "most-free-addresses",
            Policy::MostFreeDevices => "most-free-devices",
            Policy::Cheapest => "cheapest",
        }
    }
}

/// When a chosen network is left for another.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveWhen {
    /// Its utilization stays above this (0 < u <= 1) for the dwell time.
    UtilizationAbove(f64),
    /// A cheaper candidate exists for the dwell time.
    Cheaper,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub when: MoveWhen,
    /// How long the condition must hold (and how long at least between two moves).
    #[serde(with = "secs")]
    pub min_dwell: Duration,
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// One choice as the pod asked for it (normalized: candidates qualified).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub interface: String,
    /// `namespace/name` of each candidate NAD, in the pod's order.
    pub from: Vec<String>,
    pub by: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#move: Option<Move>,
}

impl Choice {
    /// The candidates as selections on the choice's interface.
    pub fn candidates(&self) -> Vec<NetworkSelection> {
        self.from
            .iter()
            .map(|n| {
                let (ns, name) = n.split_once('/').expect("qualified when parsed");
                NetworkSelection {
                    namespace: ns.into(),
                    name: name.into(),
                    interface: self.interface.clone(),
                    ..Default::default()
                }
            })
            .collect()
    }
}

/// A network chosen for a choice: the choice as the pod asked, why this network, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chosen {
    pub choice: Choice,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
    /// Being moved away from: its successor is up, and it goes after the grace period
    /// (the mover's, not the reconciler's, to remove).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retiring: bool,
}

/// Parses the annotation; `pod_namespace` qualifies bare candidate names.
pub fn parse(annotation: &str, pod_namespace: &str) -> Result<Vec<Choice>, ChoiceError> {
    let v: Value =
        serde_json::from_str(annotation).map_err(|e| err("", format!("not valid JSON: {e}")))?;
    let Value::Array(list) = v else {
        return Err(err("", "must be a JSON list of choices"));
    };
    if list.len() > MAX_CHOICES {
        return Err(err(
            "",
            format!("at most {MAX_CHOICES} choices, got {}", list.len()),
        ));
    }
    let mut out: Vec<Choice> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let at = |f: &str| format!("[{i}]{f}");
        let Value::Object(m) = c else {
            return Err(err(at(""), "must be an object"));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["interface", "from", "by", "move"].contains(&k.as_str()))
        {
            return Err(err(
                at(""),
                format!("unknown field {k:?} (interface, from, by, move)"),
            ));
        }
        let interface = match m.get("interface") {
            Some(Value::String(s)) => s.clone(),
            None => {
                return Err(err(
                    at(".interface"),
                    "is required (the interface the chosen network gets)",
                ))
            }
            Some(_) => return Err(err(at(".interface"), "must be a string")),
        };
        trellis_cni::env::validate_ifname(&interface)
            .map_err(|m| err(at(".interface"), format!("{interface:?} {m}")))?;
        if out.iter().any(|o| o.interface == interface) {
            return Err(err(
                at(".interface"),
                format!("{interface:?} is chosen twice"),
            ));
        }
        let from = match m.get("from") {
            Some(Value::Array(l)) if !l.is_empty() => l,
            Some(Value::Array(_)) | None => {
                return Err(err(
                    at(".from"),
                    "must list at least one NetworkAttachmentDefinition",
                ))
            }
            Some(_) => {
                return Err(err(
                    at(".from"),
                    "must be a list of NetworkAttachmentDefinition names",
                ))
            }
        };
        if from.len() > MAX_CANDIDATES {
            return Err(err(
                at(".from"),
                format!("at most {MAX_CANDIDATES} candidates, got {}", from.len()),
            ));
        }
        let mut names = Vec::new();
        for (j, n) in from.iter().enumerate() {
            let at = at(&format!(".from[{j}]"));
            let Value::String(n) = n else {
                return Err(err(at, "must be a string ([namespace/]name)"));
            };
            let sel = match selection::parse_networks_asked(n, pod_namespace) {
                Ok(l) if l.len() == 1 && l[0].interface.is_empty() => l.into_iter().next().unwrap(),
                Ok(_) => {
                    return Err(err(
                        at,
                        format!(
                            "{n:?} must name one NetworkAttachmentDefinition as [namespace/]name"
                        ),
                    ))
                }
                Err(e) => return Err(err(at, e.to_string())),
            };
            let q = sel.qualified_name();
            if names.contains(&q) {
                return Err(err(at, format!("{q} is listed twice")));
            }
            names.push(q);
        }
        let by = match m.get("by") {
            Some(Value::String(s)) => Policy::parse(s).ok_or_else(|| {
                err(
                    at(".by"),
                    format!("unknown policy {s:?} ({})", Policy::NAMES),
                )
            })?,
            None => return Err(err(at(".by"), format!("is required ({})", Policy::NAMES))),
            Some(_) => return Err(err(at(".by"), "must be a string")),
        };
        let r#move = match m.get("move") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_move(v, &at(".move"))?),
        };
        if r#move.is_some() && interface.len() > 14 {
            return Err(err(
                at(".interface"),
                format!("{interface:?}: a choice that moves needs a name of at most 14 characters (a moved attachment comes up as {interface}m)"),
            ));
        }
        out.push(Choice {
            interface,
            from: names,
            by,
            r#move,
        });
    }
    Ok(out)
}

fn parse_move(v: &Value, at: &str) -> Result<Move, ChoiceError> {
    let Value::Object(m) = v else {
        return Err(err(
            at,
            "must be an object {\"when\": ..., \"min_dwell\": ...}",
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["when", "min_dwell"].contains(&k.as_str()))
    {
        return Err(err(at, format!("unknown field {k:?} (when, min_dwell)")));
    }
    let when = match m.get("when") {
        Some(Value::String(s)) => parse_when(s).ok_or_else(|| {
            err(
                format!("{at}.when"),
                format!("{s:?}: must be \"utilization > X\" (0 < X <= 1) or \"cheaper\""),
            )
        })?,
        _ => {
            return Err(err(
                format!("{at}.when"),
                "is required: \"utilization > X\" or \"cheaper\"",
            ))
        }
    };
    let min_dwell = match m.get("min_dwell") {
        Some(Value::String(s)) => parse_duration(s).ok_or_else(|| {
            err(format!("{at}.min_dwell"), format!("{s:?}: must be a duration such as \"60s\" or \"5m\""))
        })?,
        None => {
            return Err(err(
                format!("{at}.min_dwell"),
                "is required: how long the condition must hold before a move (\"60s\"); without it a network could flap",
            ))
        }
        Some(_) => return Err(err(format!("{at}.min_dwell"), "must be a string such as \"60s\"")),
    };
    if !(MIN_DWELL..=MAX_DWELL).contains(&min_dwell) {
        return Err(err(format!("{at}.min_dwell"), "must be between 1s and 24h"));
    }
    Ok(Move { when, min_dwell })
}

fn parse_when(s: &str) -> Option<MoveWhen> {
    let s = s.trim();
    if s == "cheaper" {
        return Some(MoveWhen::Cheaper);
    }
    let rest = s
        .strip_prefix("utilization")?
        .trim_start()
        .strip_prefix('>')?
        .trim();
    let x: f64 = rest.parse().ok()?;
    (x > 0.0 && x <= 1.0).then_some(MoveWhen::UtilizationAbove(x))
}

/// `90s`, `5m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total = total.checked_add(n.checked_mul(match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        })?)?;
        any = true;
    }
    (num.is_empty() && any).then(|| Duration::from_secs(total))
}

/// A NAD's `trellis.dev/capacity` in bits/s: a whole number, or one with a k, M, G or
/// T suffix (SI; `bit`/`bps` after it allowed).
pub fn parse_capacity(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("bps")
        .or_else(|| t.strip_suffix("bit"))
        .unwrap_or(t);
    let (digits, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1_000u64),
        'M' => (&t[..t.len() - 1], 1_000_000),
        'G' => (&t[..t.len() - 1], 1_000_000_000),
        'T' => (&t[..t.len() - 1], 1_000_000_000_000),
        _ => (t, 1),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(mult).filter(|v| *v > 0)
}

/// A NAD's `trellis.dev/cost`: a finite number >= 0.
pub fn parse_cost(s: &str) -> Option<f64> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|c| c.is_finite() && *c >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_parses_with_names_qualified() {
        let c = parse(
            r#"[{"interface": "data0", "from": ["a", "other/b"], "by": "least-utilized",
                 "move": {"when": "utilization > 0.8", "min_dwell": "1m30s"}}]"#,
            "ns",
        )
        .unwrap();
        assert_eq!(c[0].from, ["ns/a", "other/b"]);
        assert_eq!(c[0].by, Policy::LeastUtilized);
        let m = c[0].r#move.as_ref().unwrap();
        assert_eq!(m.when, MoveWhen::UtilizationAbove(0.8));
        assert_eq!(m.min_dwell, Duration::from_secs(90));
    }

    #[test]
    fn bad_choices_name_the_field() {
        for (text, expect) in [
            (r#"{"a": 1}"#, "must be a JSON list"),
            (
                r#"[{"from": ["a"], "by": "cheapest"}]"#,
                "[0].interface: is required",
            ),
            (
                r#"[{"interface": "x", "from": [], "by": "cheapest"}]"#,
                "[0].from: must list",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "fastest"}]"#,
                "[0].by: unknown policy \"fastest\"",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "cheapest", "move": {"when": "cheaper"}}]"#,
                "[0].move.min_dwell: is required",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "cheapest", "move": {"when": "utilization > 2", "min_dwell": "5s"}}]"#,
                "[0].move.when",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "cheapest", "move": {"when": "cheaper", "min_dwell": "5 parsecs"}}]"#,
                "[0].move.min_dwell",
            ),
            (
                r#"[{"interface": "x", "from": ["a", "a"], "by": "cheapest"}]"#,
                "[0].from[1]: ns/a is listed twice",
            ),
            (
                r#"[{"interface": "x", "from": ["a@b"], "by": "cheapest"}]"#,
                "[0].from[0]",
            ),
            (
                r#"[{"interface": "x", "from": ["../a"], "by": "cheapest"}]"#,
                "[0].from[0]",
            ),
            (
                r#"[{"interface": "a/b", "from": ["a"], "by": "cheapest"}]"#,
                "[0].interface",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "cheapest"}, {"interface": "x", "from": ["b"], "by": "cheapest"}]"#,
                "[1].interface: \"x\" is chosen twice",
            ),
            (
                r#"[{"interface": "x", "from": ["a"], "by": "cheapest", "extra": 1}]"#,
                "unknown field \"extra\"",
            ),
        ] {
            let e = parse(text, "ns").unwrap_err().to_string();
            assert!(e.contains(expect), "{text}: {e}");
            assert!(
                e.starts_with("annotation trellis.dev/network-choice"),
                "{e}"
            );
        }
    }

    #[test]
    fn capacities_costs_and_durations() {
        assert_eq!(parse_capacity("10G"), Some(10_000_000_000));
        assert_eq!(parse_capacity("100Mbit"), Some(100_000_000));
        assert_eq!(parse_capacity("2500"), Some(2500));
        assert_eq!(parse_capacity("0"), None);
        assert_eq!(parse_capacity("fast"), None);
        assert_eq!(parse_capacity("99999999999T"), None);
        assert_eq!(parse_cost("1.5"), Some(1.5));
        assert_eq!(parse_cost("-1"), None);
        assert_eq!(parse_cost("NaN"), None);
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h5m"), Some(Duration::from_secs(3900)));
        assert_eq!(parse_duration("60"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
