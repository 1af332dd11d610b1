//! Per-container locks.

/// Serialises calls for one container (the runtime may retry DEL while ADD runs).
#[derive(Default)]
pub(crate) struct ContainerLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

pub(crate) struct ContainerGuard<'a> {
    locks: &'a ContainerLocks,
    id: String,
}

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

impl ContainerLocks {
    /// The lock if no one holds it now.
    pub(crate) fn try_lock(&self, id: &str) -> Option<ContainerGuard<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return None;
        }
        Some(ContainerGuard {
            locks: self,
            id: id.to_string(),
        })
    }

    pub(crate) fn lock(&self, id: &str) -> ContainerGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(id) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(id.to_string());
        ContainerGuard {
            locks: self,
            id: id.to_string(),
        }
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.locks.freed.notify_all();
    }
}
