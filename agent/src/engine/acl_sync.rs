//! Keeps the ACLs of live attachments equal to their NADs.

use super::Engine;
use std::collections::BTreeMap;
use std::sync::Arc;

impl Engine {
    /// Keeps the ACLs of live attachments equal to their NADs: every `period`, the
    /// NAD of each network with attachments is read again (the Kubernetes source
    /// answers from its watch cache) and a changed `trellis.dev/acl` replaces the
    /// network's tables in place. A NAD whose new ACL is invalid keeps the old rules
    /// (logged once per change).
    pub fn start_acl_sync(self: &Arc<Self>, period: std::time::Duration) {
        if self.dataplane.is_none() {
            return;
        }
        let h = Arc::clone(self);
        std::thread::Builder::new()
            .name("trellis-acl-sync".into())
            .spawn(move || {
                let mut reported: BTreeMap<String, String> = BTreeMap::new();
                loop {
                    std::thread::sleep(period);
                    h.sync_acls(&mut reported);
                }
            })
            .expect("ACL sync thread");
    }

    /// One pass of the ACL sync (see `start_acl_sync`).
    pub fn sync_acls(&self, reported: &mut BTreeMap<String, String>) {
        let Some(dp) = &self.dataplane else { return };
        let networks = {
            // Under the dataplane lock: an ADD records its read of a new network under
            // it too, so it is never dropped here before its network is listed.
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            let networks = match dp.networks() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("ACL sync: {e}");
                    return;
                }
            };
            self.acl_read_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|n, _| networks.contains(n));
            networks
        };
        for network in networks {
            // The cluster default network (from a conf file) has no NAD.
            let Some((ns, name)) = network.split_once('/') else {
                continue;
            };
            let read_at = std::time::Instant::now();
            let nad = match self.source.get_nad(ns, name) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(%network, "ACL sync: {e}");
                    continue;
                }
            };
            let acl = match nad.acl() {
                Ok(acl) => acl,
                Err(e) => {
                    let msg = e.to_string();
                    if reported.get(&network) != Some(&msg) {
                        tracing::warn!(%network, "keeping the current rules: NetworkAttachmentDefinition {}: {msg}", nad.qualified_name());
                        reported.insert(network.clone(), msg);
                    }
                    continue;
                }
            };
            reported.remove(&network);
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            // Its last attachment went while the NAD was read: an ACL set now would
            // hold an id that no DEL frees.
            if !dp.slots_of(&network).is_ok_and(|s| !s.is_empty()) {
                continue;
            }
            let current = dp.acl_of(&network).ok().flatten().map(|(_, d)| d);
            if current == acl.as_ref().map(|a| a.digest()) {
                continue;
            }
            match self.set_acl_read_at(&mut dp, &network, acl.as_ref(), read_at) {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    %network,
                    rules = acl.as_ref().map(|a| a.rules.len()).unwrap_or(0),
                    "ACL updated from its NetworkAttachmentDefinition"
                ),
                Err(e) => tracing::warn!(%network, "ACL update: {e}"),
            }
        }
    }
}
