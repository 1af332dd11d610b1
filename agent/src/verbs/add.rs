//! ADD: plan the pod's networks, make each, record them, and answer the merged result.

use super::request::{pod_ref, runtime_annotations, ShimConf};
use super::Handler;
use crate::engine::{check_logical_addresses, from_record_err, from_source_err, invalid};
use crate::records::{Attachment, Record};
use crate::selection::NETWORKS_ANNOTATION;
use serde_json::Value;
use std::collections::BTreeMap;
use trellis_cni::{CniEnv, CniError, CniResult, ErrorCode};

impl Handler {
    pub(super) fn add(&self, env: &CniEnv, shim: &ShimConf) -> Result<Value, CniError> {
        let engine = &self.engine;
        let _lock = engine.locks.lock(&env.container_id);
        if engine
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
            .is_some()
        {
            return Err(invalid(format!(
                "container {} already has attachments; DEL it before another ADD",
                env.container_id
            )));
        }
        let pod = pod_ref(env);
        let runtime_annotations = runtime_annotations(&shim.runtime_config)?;
        let annotations = match &pod {
            Some(p) => engine
                .source
                .pod_annotations(p, runtime_annotations.as_ref())
                .map_err(from_source_err)?,
            None => BTreeMap::new(),
        };
        let mut plan = engine.plan(env, pod.as_ref(), &annotations, &shim.runtime_config)?;
        let mut record = Record {
            container_id: env.container_id.clone(),
            netns: env.netns.clone(),
            ifname: env.ifname.clone(),
            pod_namespace: pod
                .as_ref()
                .map(|p| p.namespace.clone())
                .unwrap_or_default(),
            pod_name: pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            pod_uid: pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default(),
            cni_args: env.args.to_string(),
            attachments: Vec::new(),
            network_status: None,
            added_at_ms: None,
            networks: annotations.get(NETWORKS_ANNOTATION).cloned(),
            choices: annotations
                .get(crate::choice::spec::CHOICE_ANNOTATION)
                .cloned(),
            static_networks: annotations
                .get(crate::engine::DYNAMIC_ANNOTATION)
                .is_some_and(|v| v == "false"),
            netns_inode: crate::netns::inode(std::path::Path::new(&env.netns)),
        };
        engine.check_logical_pods(pod.as_ref(), &plan)?;
        engine.check_wires(&mut plan)?;
        record.attachments = plan.iter().map(|p| p.to_attachment()).collect();
        // Networks with an ACL are attached (and filtered) before ADD returns.
        let acls: Vec<_> = plan.iter().map(|p| p.acl.clone()).collect();
        // Logical networks: the checks against the cluster's logical NADs and this
        // node's live pods, and the plan's save, are one step against other changes.
        let gate = plan.iter().any(|p| p.logical.is_some()).then(|| {
            engine
                .logical_gate
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        });
        if gate.is_some() {
            engine.check_carvings(&plan)?;
            engine.check_logical_overlaps(&record)?;
        }
        // The whole plan, on disk before the first delegate runs: a crash anywhere in
        // the ADD is undone by DEL. (One fdatasync per ADD; the saves after it describe
        // what already happened and need none.)
        if let Err(e) = engine.records.save(&record) {
            record.attachments.clear();
            return Err(engine.roll_back(record, from_record_err(e)));
        }
        drop(gate);
        for i in 0..plan.len() {
            if let Err(f) = engine.make(&mut record, i) {
                return Err(engine.roll_back_with(record, f.err, f.lenient));
            }
        }
        if let Err(e) = check_logical_addresses(&record) {
            return Err(engine.roll_back(record, e));
        }
        if let Err(e) = crate::routes::apply_default_routes(&env.netns, &record.attachments) {
            return Err(engine.roll_back(record, invalid(e.to_string())));
        }
        if let Err(e) = engine.attach_with_acls(&mut record, &acls, 0) {
            return Err(engine.roll_back(record, e));
        }
        // The other interfaces: counted from their first packet too. One that cannot
        // be attached does not fail the pod (it is retried at the next agent start).
        if let Err(e) = engine.attach_dataplane(&mut record, false) {
            tracing::warn!(container = %record.container_id, "dataplane: {}", e.msg);
        }
        let merged = match merged_result(&record.attachments, &shim.cni_version) {
            Ok(m) => m,
            Err(e) => return Err(engine.roll_back(record, e)),
        };
        let status = crate::network_status::build(&record.attachments);
        record.network_status = Some(status.clone());
        record.added_at_ms = Some(crate::records::now_ms());
        if let Err(e) = engine.records.save_unsynced(&record) {
            return Err(engine.roll_back(record, from_record_err(e)));
        }
        if let Some(p) = &pod {
            engine.publish_status(p, &status);
            if engine.added_events_at_add {
                for a in &record.attachments {
                    engine.added_event(p, &status, a);
                }
            }
        }
        Ok(merged)
    }
}

/// The cluster network's result with every attachment's interfaces and IPs added.
fn merged_result(attachments: &[Attachment], version: &str) -> Result<Value, CniError> {
    let mut merged: Option<CniResult> = None;
    for a in attachments {
        let Some(raw) = &a.result else { continue };
        let r = CniResult::from_value(raw)
            .map_err(|e| CniError::new(ErrorCode::Decode, format!("network {}: {e}", a.network)))?;
        match &mut merged {
            None => merged = Some(r),
            Some(m) => m.merge_attachment(&r),
        }
    }
    let merged = merged.unwrap_or_default();
    merged
        .to_value(version)
        .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e.to_string()))
}
