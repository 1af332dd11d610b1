//! The network types the agent runs itself rather than exec'ing a plugin binary.

use std::sync::Arc;
use trellis_cni::invoke::{InProcessPlugins, InvokeError, Target};
use trellis_cni::Command;

#[derive(Debug)]
pub struct Builtins(pub Vec<Arc<dyn InProcessPlugins>>);

impl InProcessPlugins for Builtins {
    fn handles(&self, plugin: &str) -> bool {
        self.0.iter().any(|p| p.handles(plugin))
    }

    fn exec(
        &self,
        plugin: &str,
        command: Command,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError> {
        let p = self
            .0
            .iter()
            .find(|p| p.handles(plugin))
            .expect("exec only after handles");
        p.exec(plugin, command, target, stdin)
    }
}
