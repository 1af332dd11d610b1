//! The operator's commands (`trellis stats`, `attachments`, `devices`): what they read,
//! filtered by pod, printed through the one table renderer or as JSON.

use crate::config::AgentConfig;
use crate::dataplane::{read_acl_hits, read_stats, SlotStats};
use crate::records::RecordStore;
use crate::table::{Align, Table};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the agent's config is when the DaemonSet runs it; the CLI reads its paths.
pub const DEFAULT_CONFIG: &str = "/etc/trellis/agent.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns sized to their content.
    Table,
    /// The table with more columns (container, slot, netns, every ACL rule).
    Wide,
    /// One JSON document (a line per refresh with --watch).
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Records(#[from] crate::records::RecordError),
    #[error("device config: {0}")]
    Devices(String),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The agent's config for the CLI: `explicit` must load; without it the default path
/// is read if it exists (in the agent's container), else nothing (built-in defaults).
pub fn load_config(explicit: Option<&Path>) -> Result<Option<AgentConfig>, CliError> {
    match explicit {
        Some(p) => Ok(Some(AgentConfig::load(p)?)),
        // Reading commands work without it: one that does not parse is said, and the
        // defaults (or the flags) are used.
        None if Path::new(DEFAULT_CONFIG).exists() => {
            match AgentConfig::load(Path::new(DEFAULT_CONFIG)) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    eprintln!("warning: {e}; using the defaults");
                    Ok(None)
                }
            }
        }
        None => Ok(None),
    }
}

/// `--namespace`, `--pod` and `--network`, the same on every command.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub network: Option<String>,
}

impl Filter {
    fn pod_matches(&self, namespace: &str, pod: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.pod.as_deref().is_none_or(|p| p == pod)
    }

    fn matches(&self, namespace: &str, pod: &str, network: &str) -> bool {
        self.pod_matches(namespace, pod) && self.network.as_deref().is_none_or(|n| n == network)
    }

    fn by_pod(&self) -> bool {
        self.namespace.is_some() || self.pod.is_some()
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// A limit as `100Mbit/1Mbit police`: rate, burst, how it is kept.
fn limit_text(l: Option<crate::dataplane::LimitView>) -> String {
    let Some(l) = l else {
        return "-".into();
    };
    let si = |v: u64| {
        let mut v = v as f64;
        let mut unit = "";
        for u in ["k", "M", "G", "T"] {
            if v < 1000.0 {
                break;
            }
            v /= 1000.0;
            unit = u;
        }
        format!("{}{unit}bit", (v * 100.0).round() / 100.0)
    };
    format!("{}/{} {}", si(l.rate), si(l.burst), l.by)
}

/// `trellis stats`: the interface counters; with `prev` (a reading `secs` earlier,
/// under --watch) the byte rates too.
pub fn stats_table(
    now: &[SlotStats],
    prev: Option<(&[SlotStats], f64)>,
    output: Output,
) -> Result<String, CliError> {
    if output == Output::Json {
        return Ok(serde_json::to_string(now)? + "\n");
    }
    let wide = output == Output::Wide;
    let mut cols = vec![
        ("NAMESPACE", Align::Left),
        ("POD", Align::Left),
        ("NETWORK", Align::Left),
        ("IFACE", Align::Left),
    ];
    if wide {
        cols.extend([("CONTAINER", Align::Left), ("SLOT", Align::Right)]);
    }
    // DROP: dropped by the ACL; LIMITED: by the rate limit.
    cols.extend([
        ("RX_BYTES", Align::Right),
        ("RX_PKTS", Align::Right),
        ("RX_DROP", Align::Right),
        ("RX_LIMITED", Align::Right),
        ("TX_BYTES", Align::Right),
        ("TX_PKTS", Align::Right),
        ("TX_DROP", Align::Right),
        ("TX_LIMITED", Align::Right),
    ]);
    if wide {
        cols.extend([("RX_LIMIT", Align::Left), ("TX_LIMIT", Align::Left)]);
    }
    if prev.is_some() {
        cols.extend([("RX_B/s", Align::Right), ("TX_B/s", Align::Right)]);
    }
    let mut t = Table::new(cols);
    for s in now {
        let o = &s.owner;
        let mut row = vec![
            o.namespace.clone(),
            o.pod.clone(),
            o.network.clone(),
            o.ifname.clone(),
        ];
        if wide {
            row.extend([short(&o.container), s.slot.to_string()]);
        }
        // Ingress at the pod's interface is what the pod receives.
        row.extend(
            [
                s.ingress.bytes,
                s.ingress.packets,
                s.ingress.drops,
                s.ingress.limited,
                s.egress.bytes,
                s.egress.packets,
                s.egress.drops,
                s.egress.limited,
            ]
            .map(|n| n.to_string()),
        );
        if wide {
            row.extend([limit_text(s.ingress_limit), limit_text(s.egress_limit)]);
        }
        if let Some((old, secs)) = prev {
            match old.iter().find(|x| x.slot == s.slot && x.owner == s.owner) {
                Some(x) => row.extend([
                    format!(
                        "{:.0}",
                        s.ingress.bytes.saturating_sub(x.ingress.bytes) as f64 / secs
                    ),
                    format!(
                        "{:.0}",
                        s.egress.bytes.saturating_sub(x.egress.bytes) as f64 / secs
                    ),
                ]),
                None => row.extend(["-".to_string(), "-".to_string()]),
            }
        }
        t.row(row);
    }
    Ok(t.render())
}

/// The slots of `dir` that pass `filter`.
pub fn read_filtered_stats(dir: &Path, filter: &Filter) -> Result<Vec<SlotStats>, CliError> {
    Ok(read_stats(dir)?
        .into_iter()
        .filter(|s| filter.matches(&s.owner.namespace, &s.owner.pod, &s.owner.network))
        .collect())
}

/// `trellis stats --acl`: per network ACL, the hits of each rule (wide: every rule,
/// hit or not) and of the default. With --namespace/--pod: the ACLs of the networks
/// those pods have an interface on.
pub fn acl_table(dir: &Path, filter: &Filter, output: Output) -> Result<String, CliError> {
    let mut acls = read_acl_hits(dir)?;
    if filter.by_pod() {
        let networks: std::collections::BTreeSet<String> = read_filtered_stats(dir, filter)?
            .into_iter()
            .map(|s| s.owner.network)
            .collect();
        acls.retain(|a| networks.contains(&a.network));
    }
    acls.retain(|a| filter.network.as_deref().is_none_or(|n| n == a.network));
    if output == Output::Json {
        return Ok(serde_json::to_string(&acls)? + "\n");
    }
    let mut t = Table::new([
        ("NETWORK", Align::Left),
        ("RULE", Align::Right),
        ("ACTION", Align::Left),
        ("PACKETS", Align::Right),
    ]);
    for a in &acls {
        for (i, (h, act)) in a.rules.iter().zip(&a.actions).enumerate() {
            if *h > 0 || output == Output::Wide {
                t.row(vec![
                    a.network.clone(),
                    i.to_string(),
                    act.to_string(),
                    h.to_string(),
                ]);
            }
        }
        t.row(vec![
            a.network.clone(),
            "default".into(),
            a.default_action.into(),
            a.default.to_string(),
        ]);
    }
    Ok(t.render())
}

/// `trellis attachments`: every pod's attachments from the agent's records.
pub fn attachments(state_dir: &Path, filter: &Filter, output: Output) -> Result<String, CliError> {
    let store = RecordStore::open(state_dir)?;
    let (records, corrupt) = store.list()?;
    for e in corrupt {
        eprintln!("warning: {e}");
    }
    let entries = |status: &Option<Value>| -> Vec<Value> {
        status
            .as_ref()
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter(|s| {
                filter
                    .network
                    .as_deref()
                    .is_none_or(|n| s["name"].as_str() == Some(n))
            })
            .cloned()
            .collect()
    };
    // With --network, only the pods on it; without, every pod, those whose ADD has not
    // finished too (no network-status yet).
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| filter.pod_matches(&r.pod_namespace, &r.pod_name))
        .filter(|r| filter.network.is_none() || !entries(&r.network_status).is_empty())
        .collect();
    if output == Output::Json {
        let v: Vec<_> = records
            .iter()
            .map(|r| {
                let status = match &r.network_status {
                    Some(_) => Value::Array(entries(&r.network_status)),
                    None => Value::Null,
                };
                serde_json::json!({
                    "namespace": r.pod_namespace, "pod": r.pod_name, "container": r.container_id,
                    "netns": r.netns, "network-status": status,
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let wide = output == Output::Wide;
    let mut cols = vec![
        ("NAMESPACE", Align::Left),
        ("POD", Align::Left),
        ("NETWORK", Align::Left),
        ("IFACE", Align::Left),
        ("IPS", Align::Left),
        ("MAC", Align::Left),
    ];
    if wide {
        cols.extend([
            ("DEVICE", Align::Left),
            ("CONTAINER", Align::Left),
            ("NETNS", Align::Left),
        ]);
    }
    let mut t = Table::new(cols);
    for r in &records {
        if r.network_status.is_none() {
            let mut row = vec![
                r.pod_namespace.clone(),
                r.pod_name.clone(),
                "-".into(),
                "-".into(),
                "(ADD not finished)".into(),
                "-".into(),
            ];
            if wide {
                row.extend(["-".into(), short(&r.container_id), r.netns.clone()]);
            }
            t.row(row);
        }
        for s in entries(&r.network_status) {
            let ips: Vec<&str> = s["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str())
                .collect();
            let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
            let mut row = vec![
                r.pod_namespace.clone(),
                r.pod_name.clone(),
                text("name"),
                text("interface"),
                if ips.is_empty() {
                    "-".into()
                } else {
                    ips.join(",")
                },
                text("mac"),
            ];
            if wide {
                let device = s["device-info"]["pci"]["pci-address"]
                    .as_str()
                    .or(s["device-info"]["vhost-user"]["path"].as_str())
                    .unwrap_or("-");
                row.extend([device.to_string(), short(&r.container_id), r.netns.clone()]);
            }
            t.row(row);
        }
    }
    Ok(t.render())
}

/// `trellis devices`: every device and socket, and the pool that takes it.
pub fn devices(
    sysfs_root: &Path,
    config: Option<&PathBuf>,
    prefix: &str,
    output: Output,
) -> Result<String, CliError> {
    use trellis_device_plugin::{config::DeviceConfig, pool::Inventory, report};
    use trellis_devices::sysfs::Sysfs;
    let config = config
        .map(|p| DeviceConfig::load(p, prefix))
        .transpose()
        .map_err(|e| CliError::Devices(e.to_string()))?;
    let inventory = Inventory {
        pci: Sysfs::new(sysfs_root)
            .discover()
            .map_err(|e| CliError::Devices(e.to_string()))?,
    };
    let rows = report::rows(&inventory, config.as_ref());
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let (header, cells) = report::cells(&rows);
    let mut t = Table::new(header.iter().map(|h| {
        (
            h.to_string(),
            if *h == "NUMA" {
                Align::Right
            } else {
                Align::Left
            },
        )
    }));
    for c in cells {
        t.row(c);
    }
    Ok(t.render())
}

/// `trellis networks`: each network's figures on this node, as the agent measures them.
pub fn networks_table(
    kpis: &[crate::choice::kpi::NetworkKpi],
    output: Output,
) -> Result<String, CliError> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(kpis)? + "\n");
    }
    let bits = |b: f64| {
        let (v, unit) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
            .into_iter()
            .find(|(m, _)| b >= *m)
            .map(|(m, u)| (b / m, u))
            .unwrap_or((b, ""));
        format!("{v:.1}{unit}")
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut t = Table::new([
        ("NETWORK", Align::Left),
        ("ATTACHMENTS", Align::Right),
        ("RX-BIT/S", Align::Right),
        ("TX-BIT/S", Align::Right),
        ("CAPACITY", Align::Right),
        ("UTILIZATION", Align::Right),
        ("FREE-ADDRESSES", Align::Right),
        ("FREE-DEVICES", Align::Right),
        ("COST", Align::Right),
    ]);
    for k in kpis {
        t.row(vec![
            k.network.clone(),
            k.attachments.to_string(),
            bits(k.rx_bps),
            bits(k.tx_bps),
            opt(k.capacity_bps.map(|c| bits(c as f64))),
            opt(k.utilization.map(|u| format!("{u:.3}"))),
            opt(k.free_addresses.map(|f| f.to_string())),
            opt(k.free_devices.map(|f| f.to_string())),
            opt(k.cost.map(|c| c.to_string())),
        ]);
    }
    Ok(t.render())
}
