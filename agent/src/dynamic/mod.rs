//! Networks that change while pods run: the annotation reconciler (hot-plug from the
//! pod watch) and the mover (a chosen network left for a better candidate). Both change
//! pods through the attachment engine.

pub mod mover;
pub mod reconciler;

use crate::engine::Engine;
use std::sync::Arc;
use std::time::Duration;

/// Starts what `[dynamic]` turns on: the reconciler where the source watches pods, the
/// mover where the dataplane measures rates.
pub fn start(engine: Arc<Engine>, every: Duration, grace: Duration) {
    if !engine.dynamic_enabled() {
        return;
    }
    reconciler::start(engine.clone());
    if engine.dataplane_running() {
        mover::start(engine, every, grace);
    }
}
