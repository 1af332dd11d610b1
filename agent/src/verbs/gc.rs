//! GC: tear down what the runtime no longer knows, then let each delegate collect.

use super::request::ShimConf;
use super::Handler;
use crate::engine::{from_record_err, invalid};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use trellis_cni::{CniError, ErrorCode, NetConfList};

pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// The spelling libcni also sends for the same list.
pub const VALID_ATTACHMENTS_ALIAS: &str = "cni.dev/attachments";

impl Handler {
    pub(super) fn gc(&self, shim: &ShimConf, received_ms: u64) -> Result<(), CniError> {
        let valid = valid_attachments(&shim.raw)?;
        // The runtime made its list before it sent it: a pod added within the grace
        // before the request arrived may be missing from it, and is kept.
        let requested_ms = received_ms.saturating_sub(self.engine.gc_grace.as_millis() as u64);
        // No ADD, DEL or CHECK runs while GC does: what it reads stays true. An ADD
        // under way when the request came finishes first, and is newer than the list.
        let _gate = self
            .engine
            .gc_gate
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let (records, corrupt) = self.engine.records.list().map_err(from_record_err)?;
        let mut failures: Vec<String> = corrupt.iter().map(ToString::to_string).collect();
        let mut confs: BTreeMap<String, NetConfList> = BTreeMap::new();
        if let Ok(c) = self.engine.load_default_network() {
            confs.insert(c.to_value().to_string(), c);
        }
        let mut live = Vec::new();
        for r in records {
            for a in &r.attachments {
                if let Ok(c) = NetConfList::from_value(a.conf.clone(), None) {
                    confs.insert(a.conf.to_string(), c);
                }
            }
            let newer = r.added_at_ms.is_some_and(|t| t >= requested_ms);
            if newer || valid.contains(&(r.container_id.clone(), r.ifname.clone())) {
                live.push(r);
                continue;
            }
            let _lock = self.engine.locks.lock(&r.container_id);
            tracing::info!(container = %r.container_id, "GC: removing stale attachments");
            failures.extend(self.engine.tear_down(r, "", false));
        }
        // Containers the runtime still runs that trellis has no record of (pods
        // started before trellis was installed): whatever holds them is kept.
        let recorded: std::collections::BTreeSet<&str> =
            live.iter().map(|r| r.container_id.as_str()).collect();
        let unrecorded: Vec<(String, String)> = valid
            .iter()
            .filter(|(id, _)| !recorded.contains(id.as_str()))
            .cloned()
            .collect();
        for conf in confs.values() {
            let keep: Vec<(String, String)> = unrecorded
                .iter()
                .cloned()
                .chain(live.iter().flat_map(|r| {
                    r.attachments
                        .iter()
                        .filter(|a| {
                            a.conf.get("name").and_then(Value::as_str) == Some(conf.name.as_str())
                        })
                        .map(|a| (r.container_id.clone(), a.ifname.clone()))
                }))
                .collect();
            failures.extend(
                self.engine
                    .invoker
                    .gc_list(conf, &keep)
                    .iter()
                    .map(|e| format!("network {}: {e}", conf.name)),
            );
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!("GC incomplete: {}", failures.join("; ")),
            ))
        }
    }
}

/// The attachments GC must keep. Without the list GC cannot tell live from stale,
/// so it is an error, never an empty list (that would tear down every pod).
fn valid_attachments(raw: &Map<String, Value>) -> Result<Vec<(String, String)>, CniError> {
    let (key, list) = match [VALID_ATTACHMENTS_KEY, VALID_ATTACHMENTS_ALIAS]
        .into_iter()
        .find_map(|k| raw.get(k).map(|v| (k, v)))
    {
        Some((k, Value::Array(l))) => (k, l),
        Some((k, _)) => return Err(invalid(format!("{k} must be a list"))),
        None => {
            return Err(invalid(format!(
                "GC needs the list of attachments to keep ({VALID_ATTACHMENTS_KEY}); without it nothing is collected"
            )))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(c), Some(i)) => Ok((c, i)),
                _ => Err(invalid(format!(
                    "{key}[{i}] needs string containerID and ifname"
                ))),
            }
        })
        .collect()
}
