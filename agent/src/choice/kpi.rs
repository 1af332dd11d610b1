//! What a network looks like on this node, for choosing between networks: its
//! measured rate (the dataplane's per-interface byte counters, sampled over a recent
//! window), its utilization against the NAD's capacity, the addresses left in its
//! host-local ranges, the devices left in its pool, its cost.

use crate::records::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One network's figures on this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkKpi {
    pub network: String,
    /// Attachments of the network on this node.
    pub attachments: usize,
    /// Measured over the window, bits per second (rx: into pods, tx: out of them).
    pub rx_bps: f64,
    pub tx_bps: f64,
    /// The NAD's `trellis.dev/capacity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bps: Option<u64>,
    /// The busier direction's rate over the capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_addresses: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_devices: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

impl NetworkKpi {
    /// The busier direction, bits per second.
    pub fn bps(&self) -> f64 {
        self.rx_bps.max(self.tx_bps)
    }
}

/// One interface's byte counters at a sample.
type Counts = HashMap<(u32, String, String), (String, u64, u64)>;

/// Samples of the dataplane's counters over a sliding window.
pub struct Sampler {
    window: Duration,
    samples: Mutex<VecDeque<(Instant, Counts)>>,
}

impl Sampler {
    pub fn new(window: Duration) -> Sampler {
        Sampler {
            window,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Adds a sample of every slot's counters (`read_stats`), taken now.
    pub fn add(&self, stats: &[crate::dataplane::SlotStats]) {
        self.add_at(Instant::now(), stats)
    }

    fn add_at(&self, at: Instant, stats: &[crate::dataplane::SlotStats]) {
        let counts: Counts = stats
            .iter()
            .map(|s| {
                (
                    (s.slot, s.owner.container.clone(), s.owner.ifname.clone()),
                    (s.owner.network.clone(), s.ingress.bytes, s.egress.bytes),
                )
            })
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((at, counts));
        // Keep one sample at or before the window's start.
        while samples.len() > 2 && samples[1].0 + self.window <= at {
            samples.pop_front();
        }
    }

    /// Per network, (rx, tx) bits per second over the window: the bytes each interface
    /// counted between the window's first and last samples (an interface that came or
    /// went in between counts from or to the sample it is in).
    pub fn rates(&self) -> BTreeMap<String, (f64, f64)> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let (Some((t0, first)), Some((t1, last))) = (samples.front(), samples.back()) else {
            return out;
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return out;
        }
        for (key, (network, rx, tx)) in last {
            // From the earliest sample the interface is in.
            let start = std::iter::once(first)
                .chain(samples.iter().map(|(_, c)| c))
                .find_map(|c| c.get(key));
            let (rx0, tx0) = start.map(|(_, r, t)| (*r, *t)).unwrap_or((*rx, *tx));
            let e = out.entry(network.clone()).or_default();
            e.0 += rx.saturating_sub(rx0) as f64 * 8.0 / secs;
            e.1 += tx.saturating_sub(tx0) as f64 * 8.0 / secs;
        }
        out
    }
}

/// Samples the pins in `bpffs_dir` every `every` into `sampler`, on its own thread.
pub fn start_sampling(
    sampler: std::sync::Arc<Sampler>,
    bpffs_dir: std::path::PathBuf,
    every: Duration,
) {
    std::thread::Builder::new()
        .name("trellis-kpi".into())
        .spawn(move || loop {
            match crate::dataplane::read_stats(&bpffs_dir) {
                Ok(stats) => sampler.add(&stats),
                Err(e) => tracing::debug!("network KPIs: {e}"),
            }
            std::thread::sleep(every);
        })
        .expect("KPI sampler thread");
}

/// The addresses a host-local IPAM config (`ipam` of a delegate) has left on this
/// node, from its ranges and the addresses this node's attachments of networks with
/// the same conf name (host-local's store) hold: for each range set, the sizes of its
/// ranges less the gateways and held addresses in them; the smallest over the sets (a
/// pod takes one address from each). None: no host-local IPAM, or ranges it cannot
/// read.
pub fn free_addresses(conf: &Value, records: &[Record]) -> Option<u64> {
    let name = conf.get("name").and_then(Value::as_str)?;
    let plugins: Vec<&Value> = match conf.get("plugins") {
        Some(Value::Array(p)) => p.iter().collect(),
        _ => vec![conf],
    };
    let ipam = plugins
        .iter()
        .filter_map(|p| p.get("ipam"))
        .find(|i| i.get("type").and_then(Value::as_str) == Some("host-local"))?;
    let sets: Vec<Vec<&Value>> = match ipam.get("ranges") {
        Some(Value::Array(sets)) => sets
            .iter()
            .map(|s| s.as_array().map(|r| r.iter().collect()).unwrap_or_default())
            .collect(),
        _ => vec![vec![ipam]],
    };
    let held: Vec<IpAddr> = records
        .iter()
        .flat_map(|r| r.attachments.iter())
        .filter(|a| a.conf.get("name").and_then(Value::as_str) == Some(name))
        .filter_map(|a| a.result.as_ref())
        .flat_map(|res| res["ips"].as_array().cloned().unwrap_or_default())
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    if sets.is_empty() || sets.iter().any(Vec::is_empty) {
        return None;
    }
    sets.iter()
        .map(|set| {
            set.iter()
                .map(|r| range_free(r, &held))
                .try_fold(0u64, |acc, f| Some(acc.saturating_add(f?)))
        })
        .try_fold(u64::MAX, |acc, f| Some(acc.min(f?)))
}

/// One host-local range (`subnet`, optional `rangeStart`, `rangeEnd`, `gateway`):
/// its size less the gateway and `held` addresses in it.
fn range_free(r: &Value, held: &[IpAddr]) -> Option<u64> {
    let subnet = r.get("subnet")?.as_str()?;
    let (addr, len) = subnet.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    if len > bits {
        return None;
    }
    let host_bits = bits - len;
    let host_mask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let base = to_u128(addr) & !host_mask;
    let last = base | host_mask;
    // host-local's defaults: the first address after the network's, and the last
    // before the broadcast (IPv4) or the last (IPv6).
    let mut start = base + 1;
    let mut end = if addr.is_ipv4() {
        last.saturating_sub(1)
    } else {
        last
    };
    if let Some(s) = r.get("rangeStart").and_then(Value::as_str) {
        start = to_u128(s.parse().ok()?);
    }
    if let Some(e) = r.get("rangeEnd").and_then(Value::as_str) {
        end = to_u128(e.parse().ok()?);
    }
    if end < start {
        return Some(0);
    }
    let gateway = match r.get("gateway").and_then(Value::as_str) {
        Some(g) => to_u128(g.parse().ok()?),
        None => base + 1,
    };
    let inside = |a: u128| a >= start && a <= end;
    let size = (end - start).saturating_add(1);
    let taken = held
        .iter()
        .filter(|h| h.is_ipv4() == addr.is_ipv4())
        .map(|h| to_u128(*h))
        .filter(|h| inside(*h) && *h != gateway)
        .count() as u128
        + u128::from(inside(gateway));
    Some(u64::try_from(size.saturating_sub(taken)).unwrap_or(u64::MAX))
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{CountersView, Owner, SlotStats};
    use serde_json::json;

    fn slot(slot: u32, network: &str, rx: u64, tx: u64) -> SlotStats {
        SlotStats {
            slot,
            owner: Owner {
                namespace: "ns".into(),
                pod: format!("p{slot}"),
                network: network.into(),
                ifname: "net1".into(),
                container: format!("c{slot}"),
            },
            ingress: CountersView {
                bytes: rx,
                ..Default::default()
            },
            egress: CountersView {
                bytes: tx,
                ..Default::default()
            },
            ingress_limit: None,
            egress_limit: None,
        }
    }

    #[test]
    fn rates_over_the_window_per_network() {
        let s = Sampler::new(Duration::from_secs(10));
        let t0 = Instant::now();
        s.add_at(t0, &[slot(1, "ns/a", 0, 0), slot(2, "ns/b", 0, 0)]);
        s.add_at(t0 + Duration::from_secs(5), &[slot(1, "ns/a", 500, 0)]);
        s.add_at(
            t0 + Duration::from_secs(10),
            &[slot(1, "ns/a", 1000, 250), slot(3, "ns/b", 100, 0)],
        );
        let r = s.rates();
        assert_eq!(r["ns/a"], (800.0, 200.0));
        // Slot 2 went (not counted); slot 3 came in the last sample (no span yet).
        assert_eq!(r["ns/b"], (0.0, 0.0));
        // Old samples fall out of the window.
        s.add_at(t0 + Duration::from_secs(30), &[slot(1, "ns/a", 1000, 250)]);
        assert_eq!(s.rates()["ns/a"], (0.0, 0.0));
    }

    fn rec(conf_name: &str, ips: &[&str]) -> Record {
        let attachments = ips
            .iter()
            .map(|ip| {
                serde_json::from_value(json!({
                    "network": "ns/x", "ifname": "net1", "conf": {"name": conf_name},
                    "result": {"ips": [{"address": format!("{ip}/24")}]}
                }))
                .unwrap()
            })
            .collect();
        serde_json::from_value::<Record>(json!({
            "container_id": "c", "netns": "/n", "ifname": "eth0", "pod_namespace": "ns",
            "pod_name": "p", "pod_uid": "u", "cni_args": "", "attachments": []
        }))
        .map(|mut r| {
            r.attachments = attachments;
            r
        })
        .unwrap()
    }

    #[test]
    fn free_addresses_from_ranges_and_held_addresses() {
        let conf = json!({"name": "a", "plugins": [{"type": "bridge",
            "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}]});
        // .1 is the gateway; .2-.254 are 253 addresses.
        assert_eq!(free_addresses(&conf, &[]), Some(253));
        let held = rec("a", &["10.1.0.2", "10.1.0.3"]);
        let other = rec("b", &["10.1.0.4"]);
        assert_eq!(free_addresses(&conf, &[held.clone(), other]), Some(251));
        let ranged = json!({"name": "a", "type": "macvlan", "ipam": {"type": "host-local",
            "ranges": [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.2", "rangeEnd": "10.1.0.11"}],
                       [{"subnet": "fd00::/120"}]]}});
        assert_eq!(free_addresses(&ranged, &[held]), Some(8));
        let dhcp = json!({"name": "a", "type": "macvlan", "ipam": {"type": "dhcp"}});
        assert_eq!(free_addresses(&dhcp, &[]), None);
    }
}
