//! Prometheus metrics on the agent (`GET /metrics`, text format 0.0.4, through
//! `prometheus-client`): the dataplane's counters per pod, network, interface and
//! direction and the ACL rule hits (read from the pins at scrape time), attachments,
//! and a CNI request latency histogram. Served by hyper on the agent's runtime with
//! bounded connections, header size and time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: CNI ADDs run delegates (tens of ms)
/// and can wait on IPAM or the API (seconds).
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

type Labels = Vec<(&'static str, String)>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// What the handler reports as it works.
#[derive(Debug)]
pub struct Metrics {
    /// (command, result) -> latencies.
    requests: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new_with_constructor(histogram),
        }
    }
}

impl Metrics {
    pub fn observe(&self, command: &str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.requests
            .get_or_create(&vec![
                ("command", command.to_string()),
                ("result", result.to_string()),
            ])
            .observe(took.as_secs_f64());
    }
}

/// The values read at scrape time: attachments from the records, the dataplane's
/// counters from its pins.
struct Scraped {
    bpffs_dir: Option<PathBuf>,
    attachments: Arc<dyn Fn() -> usize + Send + Sync>,
}

/// The networks' figures, read at each scrape.
pub type NetworkKpis = Arc<dyn Fn() -> Vec<crate::choice::kpi::NetworkKpi> + Send + Sync>;

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped")
            .field("bpffs_dir", &self.bpffs_dir)
            .finish()
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The networks' figures on this node (`trellis networks`).
fn network_gauges(
    enc: &mut DescriptorEncoder,
    kpis: &[crate::choice::kpi::NetworkKpi],
) -> Result<(), std::fmt::Error> {
    let net = |k: &crate::choice::kpi::NetworkKpi| vec![("network", k.network.clone())];
    gauge(
        enc,
        "trellis_network_rate_bits_per_second",
        "A network's measured rate on this node over the agent's window, by direction (rx into pods)",
        kpis.iter().flat_map(|k| {
            [("rx", k.rx_bps), ("tx", k.tx_bps)].map(|(d, v)| {
                let mut l = net(k);
                l.push(("direction", d.to_string()));
                (l, v)
            })
        }),
    )?;
    let opt = |f: fn(&crate::choice::kpi::NetworkKpi) -> Option<f64>| {
        kpis.iter()
            .filter_map(move |k| f(k).map(|v| (net(k), v)))
            .collect::<Vec<_>>()
    };
    gauge(
        enc,
        "trellis_network_utilization_ratio",
        "A network's busier direction over its NAD's trellis.dev/capacity",
        opt(|k| k.utilization),
    )?;
    gauge(
        enc,
        "trellis_network_free_addresses",
        "Addresses left in a network's host-local ranges on this node",
        opt(|k| k.free_addresses.map(|f| f as f64)),
    )?;
    gauge(
        enc,
        "trellis_network_free_devices",
        "Devices left in a network's resource pool on this node",
        opt(|k| k.free_devices.map(|f| f as f64)),
    )?;
    gauge(
        enc,
        "trellis_network_cost",
        "A network's trellis.dev/cost",
        opt(|k| k.cost),
    )
}

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = (self.attachments)();
        let g = ConstGauge::new(n as i64);
        g.encode(enc.encode_descriptor(
            "trellis_attachments",
            "Pod network attachments the agent holds",
            None,
            g.metric_type(),
        )?)?;
        let Some(dir) = &self.bpffs_dir else {
            return Ok(());
        };
        match crate::dataplane::read_stats(dir) {
            Ok(stats) => {
                let rows = |pick: fn(&crate::dataplane::CountersView) -> u64| {
                    stats
                        .iter()
                        .flat_map(|s| {
                            [("rx", &s.ingress), ("tx", &s.egress)].map(|(d, c)| {
                                (
                                    vec![
                                        ("namespace", s.owner.namespace.clone()),
                                        ("pod", s.owner.pod.clone()),
                                        ("network", s.owner.network.clone()),
                                        ("interface", s.owner.ifname.clone()),
                                        ("direction", d.to_string()),
                                    ],
                                    pick(c),
                                )
                            })
                        })
                        .collect::<Vec<_>>()
                };
                counter(
                    &mut enc,
                    "trellis_interface_bytes",
                    "Bytes through a pod interface, by direction (rx into the pod, tx out of it)",
                    rows(|c| c.bytes),
                )?;
                counter(
                    &mut enc,
                    "trellis_interface_packets",
                    "Packets through a pod interface, by direction",
                    rows(|c| c.packets),
                )?;
                counter(
                    &mut enc,
                    "trellis_interface_drops",
                    "Packets the dataplane's ACL dropped on a pod interface, by direction",
                    rows(|c| c.drops),
                )?;
                counter(
                    &mut enc,
                    "trellis_interface_rate_limited_packets",
                    "Packets the dataplane dropped on a pod interface for its bandwidth limit, by direction",
                    rows(|c| c.limited),
                )?;
                counter(
                    &mut enc,
                    "trellis_interface_rate_limited_bytes",
                    "Bytes of the packets dropped for a bandwidth limit, by direction",
                    rows(|c| c.limited_bytes),
                )?;
                let mut m = enc.encode_descriptor(
                    "trellis_interface_bandwidth_limit_bits_per_second",
                    "A pod interface's bandwidth limit, by direction and how it is kept (police: dropped above it; htb: queued; fq: paced)",
                    None,
                    MetricType::Gauge,
                )?;
                for s in &stats {
                    for (d, l) in [("rx", s.ingress_limit), ("tx", s.egress_limit)] {
                        let Some(l) = l else { continue };
                        let labels: Labels = vec![
                            ("namespace", s.owner.namespace.clone()),
                            ("pod", s.owner.pod.clone()),
                            ("network", s.owner.network.clone()),
                            ("interface", s.owner.ifname.clone()),
                            ("direction", d.to_string()),
                            ("by", l.by.to_string()),
                        ];
                        ConstGauge::new(l.rate as i64).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            Err(e) => tracing::warn!("metrics: dataplane counters: {e}"),
        }
        match crate::dataplane::read_acl_hits(dir) {
            Ok(acls) => {
                // Rules that never matched are left out (a network may have 10,000);
                // the default is always shown.
                let mut hits = Vec::new();
                let mut drops = Vec::new();
                for a in &acls {
                    let rows = a
                        .rules
                        .iter()
                        .zip(&a.actions)
                        .enumerate()
                        .filter(|(_, (h, _))| **h > 0)
                        .map(|(i, (h, act))| (i.to_string(), *h, *act))
                        .chain([("default".to_string(), a.default, a.default_action)]);
                    for (rule, h, act) in rows {
                        let l = vec![("network", a.network.clone()), ("rule", rule)];
                        if act == "deny" {
                            drops.push((l.clone(), h));
                        }
                        let mut l = l;
                        l.push(("action", act.to_string()));
                        hits.push((l, h));
                    }
                }
                counter(
                    &mut enc,
                    "trellis_acl_rule_hits",
                    "Packets an ACL rule decided (rule: its index in the NAD's rules, or default)",
                    hits,
                )?;
                counter(
                    &mut enc,
                    "trellis_acl_drops",
                    "Packets an ACL dropped, by the rule that dropped them",
                    drops,
                )?;
            }
            Err(e) => tracing::warn!("metrics: ACL counters: {e}"),
        }
        Ok(())
    }
}

struct NetworkCollector(NetworkKpis);

impl std::fmt::Debug for NetworkCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetworkCollector")
    }
}

impl Collector for NetworkCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        network_gauges(&mut enc, &(self.0)())
    }
}

/// A probe: Ok, or why not.
pub type Probe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Everything `/metrics` shows, and the probes `/healthz` and `/readyz` run.
pub struct Exposition {
    registry: Registry,
    live: Option<Probe>,
    ready: Option<Probe>,
}

impl Exposition {
    pub fn new(
        metrics: &Metrics,
        bpffs_dir: Option<PathBuf>,
        attachments: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Exposition {
        let mut registry = Registry::default();
        registry.register(
            "trellis_cni_request_duration_seconds",
            "CNI requests the agent answered, by command and result",
            metrics.requests.clone(),
        );
        registry.register_collector(Box::new(Scraped {
            bpffs_dir,
            attachments,
        }));
        Exposition {
            registry,
            live: None,
            ready: None,
        }
    }

    /// `/metrics` shows the networks' figures `kpis` gives.
    pub fn with_networks(mut self, kpis: NetworkKpis) -> Exposition {
        self.registry
            .register_collector(Box::new(NetworkCollector(kpis)));
        self
    }

    /// `/healthz` runs `live`, `/readyz` runs `ready`.
    pub fn with_probes(mut self, live: Probe, ready: Probe) -> Exposition {
        self.live = Some(live);
        self.ready = Some(ready);
        self
    }

    /// The whole exposition, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// The request head must arrive within this...
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and be at most this big (hyper answers 431 and closes beyond it).
const MAX_HEAD: usize = 16 << 10;
/// A whole connection, keep-alive included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

async fn metrics(
    axum::extract::State(exp): axum::extract::State<Arc<Exposition>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Reading the pins is a few syscalls per slot: off the async workers.
    let body = tokio::task::spawn_blocking(move || exp.render())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        body,
    )
        .into_response()
}

async fn probe(probe: Option<Probe>) -> (axum::http::StatusCode, String) {
    let Some(p) = probe else {
        return (axum::http::StatusCode::OK, "ok\n".into());
    };
    // A probe may read files or ask the API cache: off the async workers.
    match tokio::task::spawn_blocking(move || p()).await {
        Ok(Ok(())) => (axum::http::StatusCode::OK, "ok\n".into()),
        Ok(Err(why)) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{why}\n"),
        ),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("probe failed: {e}\n"),
        ),
    }
}

async fn healthz(
    axum::extract::State(exp): axum::extract::State<Arc<Exposition>>,
) -> (axum::http::StatusCode, String) {
    probe(exp.live.clone()).await
}

async fn readyz(
    axum::extract::State(exp): axum::extract::State<Arc<Exposition>>,
) -> (axum::http::StatusCode, String) {
    probe(exp.ready.clone()).await
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until the runtime
/// stops.
pub async fn serve(listener: tokio::net::TcpListener, exposition: Arc<Exposition>) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(exposition);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("ADD", true, Duration::from_millis(3));
        m.observe("ADD", true, Duration::from_millis(30));
        m.observe("DEL", false, Duration::from_secs(20));
        let text = Exposition::new(&m, None, Arc::new(|| 4)).render();
        assert!(text.contains("trellis_attachments 4\n"), "{text}");
        let l = "command=\"ADD\",result=\"ok\"";
        for (le, n) in [("0.0025", 0), ("0.005", 1), ("0.05", 2)] {
            let line =
                format!("trellis_cni_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} not in {text}");
        }
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_count{{{l}}} 2\n"
            )),
            "{text}"
        );
        let d = "command=\"DEL\",result=\"error\"";
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_bucket{{{d},le=\"10\"}} 0\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_bucket{{{d},le=\"+Inf\"}} 1\n"
            )),
            "{text}"
        );
    }
}
