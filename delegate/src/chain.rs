//! A whole conflist, the way libcni chains it: prevResult forwarded on ADD, reverse
//! order on DEL, CHECK, GC, STATUS.

use crate::exec::{InvokeError, Invoker, Target};
use serde_json::{json, Map, Value};
use trellis_cni::env::Command as CniCommand;
use trellis_cni::result::{CniResult, ResultError};
use trellis_cni::NetConfList;

impl Invoker {
    /// ADD through the whole list; returns the last plugin's result (in the list's
    /// version), or the error with how many plugins need a DEL: those before the
    /// failing one, and the failing one too unless it reported its error (see
    /// `InvokeError::needs_del`).
    pub fn add_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
    ) -> Result<Value, (usize, InvokeError)> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let plugin = list.plugin_type(i);
            let stdin = list.plugin_stdin(i, runtime_config, prev.as_ref());
            let out = self
                .exec(
                    plugin,
                    CniCommand::Add,
                    target,
                    stdin.to_string().as_bytes(),
                )
                .map_err(|e| (i + usize::from(e.needs_del()), e))?;
            // Exit 0 with a bad result: the plugin did its work, so it needs a DEL too.
            let bad = |source| {
                (
                    i + 1,
                    InvokeError::BadResult {
                        plugin: plugin.to_string(),
                        source,
                    },
                )
            };
            let value: Value = serde_json::from_slice(&out).map_err(|e| {
                bad(ResultError::Field {
                    field: "(document)".into(),
                    reason: e.to_string(),
                })
            })?;
            CniResult::from_value(&value).map_err(bad)?;
            prev = Some(value);
        }
        Ok(prev.unwrap_or_else(|| json!({"cniVersion": list.cni_version})))
    }

    /// DEL through the list in reverse. Every plugin is asked even when one fails; all
    /// failures are returned.
    pub fn del_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
        cached: Option<&Value>,
    ) -> Vec<InvokeError> {
        let prev = cached.filter(|_| list.version().del_gets_prev_result());
        let mut errors = Vec::new();
        for i in (0..list.plugins.len()).rev() {
            let stdin = list.plugin_stdin(i, runtime_config, prev);
            if let Err(e) = self.exec(
                list.plugin_type(i),
                CniCommand::Del,
                target,
                stdin.to_string().as_bytes(),
            ) {
                errors.push(e);
            }
        }
        errors
    }

    /// CHECK through the list with the cached result; skipped for versions before
    /// 0.4.0 and for lists with disableCheck.
    pub fn check_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
        cached: &Value,
    ) -> Result<(), InvokeError> {
        if list.disable_check || !list.version().supports_check() {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            let stdin = list.plugin_stdin(i, runtime_config, Some(cached));
            self.exec(
                list.plugin_type(i),
                CniCommand::Check,
                target,
                stdin.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// GC with the attachments still valid, as (container ID, ifname) pairs; skipped
    /// for versions before 1.1.0 and for lists with disableGC.
    pub fn gc_list(&self, list: &NetConfList, valid: &[(String, String)]) -> Vec<InvokeError> {
        if list.disable_gc || !list.version().supports_status_gc() {
            return Vec::new();
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let mut errors = Vec::new();
        for i in 0..list.plugins.len() {
            let mut stdin = list.plugin_stdin(i, &Map::new(), None);
            stdin["cni.dev/valid-attachments"] = Value::Array(attachments.clone());
            if let Err(e) = self.exec(
                list.plugin_type(i),
                CniCommand::Gc,
                &Target::default(),
                stdin.to_string().as_bytes(),
            ) {
                errors.push(e);
            }
        }
        errors
    }

    /// STATUS: for 1.1.0 lists each plugin is asked; for older ones it is enough
    /// that every plugin binary is present.
    pub fn status_list(&self, list: &NetConfList) -> Result<(), InvokeError> {
        for i in 0..list.plugins.len() {
            let plugin = list.plugin_type(i);
            if list.version().supports_status_gc() {
                let stdin = list.plugin_stdin(i, &Map::new(), None);
                self.exec(
                    plugin,
                    CniCommand::Status,
                    &Target::default(),
                    stdin.to_string().as_bytes(),
                )?;
            } else {
                self.find(plugin)?;
            }
        }
        Ok(())
    }
}
