//! Bandwidth limits of an attachment: the pod's NPWG selection `bandwidth` and the
//! NAD's network-wide cap `trellis.dev/bandwidth`, both with the reference
//! `bandwidth` plugin's fields and semantics (rates in bits per second, bursts in
//! bits; a rate needs its burst and a burst its rate; 0 or absent: no limit).
//! Ingress is what the pod receives, egress what it sends.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_ebpf_common::{POLICE_MAX_BURST, POLICE_MAX_RATE, POLICE_MIN_RATE};

/// The NAD annotation: a JSON object like the selection's `bandwidth`, the most a
/// pod of the network gets; a pod's selection may lower it, never raise it.
pub const BANDWIDTH_ANNOTATION: &str = "trellis.dev/bandwidth";

const FIELDS: [&str; 4] = ["ingressRate", "ingressBurst", "egressRate", "egressBurst"];

/// How the dataplane keeps an ingress limit (`[dataplane] ingress_limit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressLimit {
    /// Queued at the rate by an HTB on an ifb device the packets are redirected to.
    #[default]
    Queue,
    /// Dropped above the rate by the programs' token bucket.
    Police,
}

/// A limit in one direction: bits per second, and bits that may go at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub rate: u64,
    pub burst: u64,
}

impl Rate {
    pub fn bytes_per_sec(&self) -> u64 {
        self.rate / 8
    }
    pub fn burst_bytes(&self) -> u64 {
        self.burst / 8
    }
}

/// An attachment's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Rate>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{at}: {message}")]
pub struct BandwidthError {
    /// The field: `bandwidth.ingressRate`, `trellis.dev/bandwidth: egressBurst`...
    pub at: String,
    pub message: String,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }

    /// Parses a `bandwidth` object; `at` names it in errors (each error names the
    /// field too).
    pub fn parse(v: &Value, at: &str) -> Result<Limits, BandwidthError> {
        let err = |field: &str, message: String| BandwidthError {
            at: if field.is_empty() {
                at.to_string()
            } else {
                format!("{at}.{field}")
            },
            message,
        };
        let Value::Object(o) = v else {
            return Err(err("", "must be a JSON object".into()));
        };
        if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(err(
                k,
                format!("unknown field (known: {})", FIELDS.join(", ")),
            ));
        }
        let num = |k: &str| -> Result<u64, BandwidthError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(0),
                Some(v) => v.as_u64().ok_or_else(|| {
                    err(
                        k,
                        format!("{v} is not a non-negative integer (bits per second or bits)"),
                    )
                }),
            }
        };
        let dir = |rate_key: &str, burst_key: &str| -> Result<Option<Rate>, BandwidthError> {
            let (rate, burst) = (num(rate_key)?, num(burst_key)?);
            match (rate, burst) {
                (0, 0) => Ok(None),
                (0, _) => Err(err(
                    rate_key,
                    format!("{burst_key} is set, so must this be"),
                )),
                (_, 0) => Err(err(
                    burst_key,
                    format!("{rate_key} is set, so must this be"),
                )),
                (r, _) if !(POLICE_MIN_RATE..=POLICE_MAX_RATE).contains(&r) => Err(err(
                    rate_key,
                    format!("{r} is outside {POLICE_MIN_RATE}..={POLICE_MAX_RATE} bits per second"),
                )),
                (_, b) if b > POLICE_MAX_BURST => Err(err(
                    burst_key,
                    format!("{b} bits is above the largest burst, {POLICE_MAX_BURST} (4 GiB)"),
                )),
                (rate, burst) => Ok(Some(Rate { rate, burst })),
            }
        };
        Ok(Limits {
            ingress: dir("ingressRate", "ingressBurst")?,
            egress: dir("egressRate", "egressBurst")?,
        })
    }

    /// The limits a pod gets: what it asked for within the network's cap (a
    /// direction it leaves out gets the cap). Asking for more than the cap, in rate
    /// or burst, is an error naming the field.
    pub fn within(asked: Limits, cap: Limits) -> Result<Limits, BandwidthError> {
        let one = |a: Option<Rate>, c: Option<Rate>, dir: &str| match (a, c) {
            (a, None) => Ok(a),
            (None, c) => Ok(c),
            (Some(a), Some(c)) => {
                for (what, asked, most) in [("Rate", a.rate, c.rate), ("Burst", a.burst, c.burst)] {
                    if asked > most {
                        return Err(BandwidthError {
                            at: format!("bandwidth.{dir}{what}"),
                            message: format!(
                                "{asked} is above the network's limit, {most} ({BANDWIDTH_ANNOTATION} on its NetworkAttachmentDefinition)"
                            ),
                        });
                    }
                }
                Ok(Some(a))
            }
        };
        Ok(Limits {
            ingress: one(asked.ingress, cap.ingress, "ingress")?,
            egress: one(asked.egress, cap.egress, "egress")?,
        })
    }

    /// As the `bandwidth` runtimeConfig a chained plugin that declares the
    /// capability takes.
    pub fn to_runtime_config(&self) -> Value {
        let mut m = Map::new();
        for (dir, r) in [("ingress", self.ingress), ("egress", self.egress)] {
            if let Some(r) = r {
                m.insert(format!("{dir}Rate"), r.rate.into());
                m.insert(format!("{dir}Burst"), r.burst.into());
            }
        }
        Value::Object(m)
    }
}

/// A VF's max_tx_rate (Mbit/s, the PF driver's unit) for an egress limit: rounded
/// down (a limit is never raised); below 1 Mbit/s is refused.
pub fn vf_max_tx_rate(egress: Rate) -> Result<u32, BandwidthError> {
    let mbps = egress.rate / 1_000_000;
    if mbps == 0 {
        return Err(BandwidthError {
            at: "bandwidth.egressRate".into(),
            message: format!(
                "{} bits per second is below 1 Mbit/s, the unit of an SR-IOV VF's rate limit (max_tx_rate)",
                egress.rate
            ),
        });
    }
    Ok(mbps.min(u32::MAX as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<Limits, BandwidthError> {
        Limits::parse(&v, "bandwidth")
    }

    #[test]
    fn parses_the_reference_plugins_fields() {
        let l = p(
            json!({"ingressRate": 100_000_000u64, "ingressBurst": 1_000_000,
            "egressRate": 10_000_000, "egressBurst": 80_000}),
        )
        .unwrap();
        assert_eq!(
            l.ingress,
            Some(Rate {
                rate: 100_000_000,
                burst: 1_000_000
            })
        );
        assert_eq!(l.egress.unwrap().bytes_per_sec(), 1_250_000);
        assert_eq!(p(json!({})).unwrap(), Limits::default());
        assert!(p(json!({"ingressRate": 0, "ingressBurst": 0}))
            .unwrap()
            .is_none());
        assert_eq!(Limits::parse(&l.to_runtime_config(), "x").unwrap(), l);
    }

    #[test]
    fn each_bad_field_is_named() {
        for (v, at, says) in [
            (json!([1]), "bandwidth", "JSON object"),
            (
                json!({"ingresRate": 1}),
                "bandwidth.ingresRate",
                "unknown field",
            ),
            (
                json!({"ingressRate": -1, "ingressBurst": 1}),
                "bandwidth.ingressRate",
                "non-negative",
            ),
            (
                json!({"egressRate": 1.5, "egressBurst": 1}),
                "bandwidth.egressRate",
                "non-negative",
            ),
            (
                json!({"egressRate": "1M", "egressBurst": 1}),
                "bandwidth.egressRate",
                "non-negative",
            ),
            (
                json!({"ingressRate": 1_000_000}),
                "bandwidth.ingressBurst",
                "ingressRate is set",
            ),
            (
                json!({"egressBurst": 1_000_000}),
                "bandwidth.egressRate",
                "egressBurst is set",
            ),
            (
                json!({"ingressRate": 999, "ingressBurst": 8}),
                "bandwidth.ingressRate",
                "outside",
            ),
            (
                json!({"ingressRate": 1u64 << 41, "ingressBurst": 8}),
                "bandwidth.ingressRate",
                "outside",
            ),
            (
                json!({"egressRate": 1_000_000, "egressBurst": POLICE_MAX_BURST + 1}),
                "bandwidth.egressBurst",
                "4 GiB",
            ),
        ] {
            let e = p(v.clone()).unwrap_err();
            assert_eq!(e.at, at, "{v}");
            assert!(e.message.contains(says), "{v}: {e}");
        }
    }

    #[test]
    fn a_pod_may_lower_the_networks_limit_never_raise_it() {
        let r = |rate, burst| Some(Rate { rate, burst });
        let cap = Limits {
            ingress: r(100_000_000, 1_000_000),
            egress: None,
        };
        // Left out: the cap; lower: kept; a direction the cap leaves free: as asked.
        let asked = Limits {
            ingress: None,
            egress: r(5_000_000, 50_000),
        };
        assert_eq!(
            Limits::within(asked, cap).unwrap(),
            Limits {
                ingress: cap.ingress,
                egress: asked.egress
            }
        );
        let lower = Limits {
            ingress: r(10_000_000, 1_000_000),
            egress: None,
        };
        assert_eq!(Limits::within(lower, cap).unwrap().ingress, lower.ingress);
        for (asked, at) in [
            (r(200_000_000, 1_000_000), "bandwidth.ingressRate"),
            (r(100_000_000, 2_000_000), "bandwidth.ingressBurst"),
        ] {
            let e = Limits::within(
                Limits {
                    ingress: asked,
                    egress: None,
                },
                cap,
            )
            .unwrap_err();
            assert_eq!(e.at, at);
            assert!(e.message.contains(BANDWIDTH_ANNOTATION), "{e}");
        }
    }

    #[test]
    fn a_vf_rate_is_whole_megabits_rounded_down() {
        let r = |rate| Rate { rate, burst: 8 };
        assert_eq!(vf_max_tx_rate(r(100_000_000)).unwrap(), 100);
        assert_eq!(vf_max_tx_rate(r(1_999_999)).unwrap(), 1);
        assert!(vf_max_tx_rate(r(999_999))
            .unwrap_err()
            .message
            .contains("below 1 Mbit/s"));
    }
}
