//! DEL: undo what the record says was made, or pass the DEL to the primary network.

use super::request::ShimConf;
use super::Handler;
use crate::engine::{from_record_err, POD_ANNOTATIONS_CAPABILITY};
use trellis_cni::{CniEnv, CniError, ErrorCode};
use trellis_delegate::Target;

impl Handler {
    pub(super) fn del(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        let _lock = self.engine.locks.lock(&env.container_id);
        let Some(record) = self
            .engine
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
        else {
            // A record file with no snapshot in it (the agent died creating it) goes.
            self.engine
                .records
                .remove(&env.container_id)
                .map_err(from_record_err)?;
            return self.del_unrecorded(env, shim);
        };
        let failures = self.engine.tear_down(record, &env.netns, false);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!("DEL incomplete: {}", failures.join("; ")),
            ))
        }
    }

    /// DEL of a container trellis has no record of: already deleted, an ADD that
    /// failed and was undone, or a pod started before trellis was installed. The last
    /// was made by the node's primary conf, which gets the DEL (DEL is idempotent, so
    /// the other two lose nothing); secondary networks were never trellis's to undo.
    fn del_unrecorded(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        use crate::config::DefaultNetwork;
        let primary = match &self.engine.default_network {
            DefaultNetwork::File(path) => crate::node_conf::read_primary(path),
            DefaultNetwork::Auto | DefaultNetwork::Nad { .. } => crate::node_conf::find_primary(
                &self.engine.cni_conf_dir,
                &self.engine.cni_conf_file,
            ),
        };
        let conf = match primary {
            Ok(p) => p.conf,
            Err(e) => {
                tracing::warn!(container = %env.container_id,
                    "DEL of a container with no attachments recorded: no primary conf to pass it to ({e})");
                return Ok(());
            }
        };
        let mut rc = shim.runtime_config.clone();
        rc.remove(POD_ANNOTATIONS_CAPABILITY);
        let args = env.args.to_string();
        let target = Target {
            container_id: &env.container_id,
            netns: &env.netns,
            ifname: &env.ifname,
            args: &args,
        };
        let errs = self.engine.invoker.del_list(&conf, &target, &rc, None);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!(
                    "DEL on the primary network {} (no attachments recorded): {}",
                    conf.name,
                    errs.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ))
        }
    }
}
