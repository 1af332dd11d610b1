//! Prometheus metrics on the agent (text exposition format 0.0.4, `GET /metrics`):
//! the dataplane's counters per pod, network, interface and direction (read from the
//! pins at scrape time), attachments, and a CNI request latency histogram.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: CNI ADDs run delegates (tens of ms)
/// and can wait on IPAM or the API (seconds).
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// What the handler reports as it works.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (command, ok) -> latencies.
    requests: Mutex<BTreeMap<(String, bool), Histogram>>,
}

impl Metrics {
    pub fn observe(&self, command: &str, ok: bool, took: Duration) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let h = m.entry((command.to_string(), ok)).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Rule hits and drops per network ACL; rules that never matched are left out (a
/// network may have 10,000), the default always shown.
fn render_acl_hits(out: &mut String, acls: &[crate::dataplane::AclHits]) {
    let hits = "trellis_acl_rule_hits_total";
    let drops = "trellis_acl_drops_total";
    out.push_str(&format!("# HELP {hits} Packets an ACL rule decided (rule: its index in the NAD's rules, or default).\n# TYPE {hits} counter\n"));
    let mut drop_lines = String::new();
    for a in acls {
        let rows = a
            .rules
            .iter()
            .zip(&a.actions)
            .enumerate()
            .filter(|(_, (h, _))| **h > 0)
            .map(|(i, (h, act))| (i.to_string(), *h, *act))
            .chain([("default".to_string(), a.default, a.default_action)]);
        for (rule, h, act) in rows {
            let l = format!("network=\"{}\",rule=\"{rule}\"", label(&a.network));
            out.push_str(&format!("{hits}{{{l},action=\"{act}\"}} {h}\n"));
            if act == "deny" {
                drop_lines.push_str(&format!("{drops}{{{l}}} {h}\n"));
            }
        }
    }
    out.push_str(&format!("# HELP {drops} Packets an ACL dropped, by the rule that dropped them.\n# TYPE {drops} counter\n"));
    out.push_str(&drop_lines);
}

/// The whole exposition.
pub fn render(
    metrics: &Metrics,
    bpffs_dir: Option<&std::path::Path>,
    attachments: usize,
) -> String {
    let mut out = String::new();
    out.push_str("# HELP trellis_attachments Pod network attachments the agent holds.\n# TYPE trellis_attachments gauge\n");
    out.push_str(&format!("trellis_attachments {attachments}\n"));
    if let Some(dir) = bpffs_dir {
        match crate::dataplane::read_stats(dir) {
            Ok(stats) => {
                for (name, help) in [
                    ("trellis_interface_bytes_total", "Bytes through a pod interface, by direction (rx into the pod, tx out of it)."),
                    ("trellis_interface_packets_total", "Packets through a pod interface, by direction."),
                    ("trellis_interface_drops_total", "Packets the dataplane dropped on a pod interface, by direction."),
                ] {
                    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
                    for s in &stats {
                        for (dir, c) in [("rx", &s.ingress), ("tx", &s.egress)] {
                            let v = match name {
                                "trellis_interface_bytes_total" => c.bytes,
                                "trellis_interface_packets_total" => c.packets,
                                _ => c.drops,
                            };
                            out.push_str(&format!(
                                "{name}{{namespace=\"{}\",pod=\"{}\",network=\"{}\",interface=\"{}\",direction=\"{dir}\"}} {v}\n",
                                label(&s.owner.namespace),
                                label(&s.owner.pod),
                                label(&s.owner.network),
                                label(&s.owner.ifname)
                            ));
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("metrics: dataplane counters: {e}"),
        }
        match crate::dataplane::read_acl_hits(dir) {
            Ok(acls) => render_acl_hits(&mut out, &acls),
            Err(e) => tracing::warn!("metrics: ACL counters: {e}"),
        }
    }
    let name = "trellis_cni_request_duration_seconds";
    out.push_str(&format!("# HELP {name} CNI requests the agent answered, by command and result.\n# TYPE {name} histogram\n"));
    let reqs = metrics
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for ((cmd, ok), h) in reqs {
        let l = format!(
            "command=\"{cmd}\",result=\"{}\"",
            if ok { "ok" } else { "error" }
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "{name}_bucket{{{l},le=\"{b}\"}} {}\n",
                h.counts[i]
            ));
        }
        out.push_str(&format!("{name}_bucket{{{l},le=\"+Inf\"}} {}\n", h.count));
        out.push_str(&format!(
            "{name}_sum{{{l}}} {}\n{name}_count{{{l}}} {}\n",
            h.sum, h.count
        ));
    }
    out
}

/// Serves `GET /metrics` on `listener`, one thread per connection.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    bpffs_dir: Option<PathBuf>,
    attachments: Arc<dyn Fn() -> usize + Send + Sync>,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (metrics, dir, attachments) =
                (metrics.clone(), bpffs_dir.clone(), attachments.clone());
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                // Headers are read and ignored.
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let mut w = conn;
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body, ctype) = if line.starts_with("GET ")
                    && (path == "/metrics" || path.starts_with("/metrics?"))
                {
                    (
                        "200 OK",
                        render(&metrics, dir.as_deref(), attachments()),
                        "text/plain; version=0.0.4",
                    )
                } else {
                    (
                        "404 Not Found",
                        "only /metrics here\n".to_string(),
                        "text/plain",
                    )
                };
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
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
        let text = render(&m, None, 4);
        assert!(text.contains("trellis_attachments 4\n"));
        let l = "command=\"ADD\",result=\"ok\"";
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_bucket{{{l},le=\"0.0025\"}} 0\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_bucket{{{l},le=\"0.05\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "trellis_cni_request_duration_seconds_count{{{l}}} 2\n"
            )),
            "{text}"
        );
        assert!(text.contains("trellis_cni_request_duration_seconds_bucket{command=\"DEL\",result=\"error\",le=\"10\"} 0\n"), "{text}");
        assert!(text.contains("trellis_cni_request_duration_seconds_bucket{command=\"DEL\",result=\"error\",le=\"+Inf\"} 1\n"), "{text}");
    }
}
