//! CHECK: each attachment's delegates check what they made.

use super::request::ShimConf;
use super::Handler;
use crate::engine::{from_record_err, invalid};
use trellis_cni::{CniEnv, CniError, ErrorCode, NetConfList, Version};
use trellis_delegate::Target;

impl Handler {
    pub(super) fn check(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        let v = Version::parse(&shim.cni_version)
            .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e))?;
        if !v.supports_check() {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "CHECK needs cniVersion 0.4.0 or later, got {}",
                    shim.cni_version
                ),
            ));
        }
        let _lock = self.engine.locks.lock(&env.container_id);
        let record = self
            .engine
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::UnknownContainer,
                    format!("container {} has no attachments", env.container_id),
                )
            })?;
        for a in &record.attachments {
            let ctx = format!("network {} ({})", a.network, a.ifname);
            let conf = NetConfList::from_value(a.conf.clone(), None)
                .map_err(|e| invalid(format!("{ctx}: recorded config unreadable: {e}")))?;
            let cached = a.result.as_ref().ok_or_else(|| {
                CniError::new(ErrorCode::Io, format!("{ctx}: ADD did not finish"))
            })?;
            let target = Target {
                container_id: &record.container_id,
                netns: &env.netns,
                ifname: &a.ifname,
                args: &record.cni_args,
            };
            self.engine
                .invoker
                .check_list(&conf, &target, &a.runtime_config, cached)
                .map_err(|e| e.to_cni_error(&ctx))?;
        }
        Ok(())
    }
}
