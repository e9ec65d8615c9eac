//! [`Shared`]: what every thread of a worker shares — its blueprints, node registry,
//! stores and settings — and the runs it is executing a node of right now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::blueprint::Blueprint;
use crate::engine::node::NodeRegistry;
use crate::runtime::resumer::Resumer;
use crate::services::postgres::store::RunStore;
use crate::services::redis::RedisCoordinationStore;

/// State every worker thread shares.
pub(crate) struct Shared {
    pub blueprints: HashMap<String, Arc<Blueprint>>,
    pub registry: NodeRegistry,
    pub store: RunStore,
    pub coord: RedisCoordinationStore,
    pub queue: String,
    pub max_iterations: u32,
    /// Base of webhook URLs (`<public_url>/webhooks/<run>/<node>`).
    pub public_url: String,
    pub events_exchange: String,
    /// Runs with a node executing right now, and how many (the heartbeat touches them).
    pub executing: Mutex<HashMap<String, usize>>,
}

impl Shared {
    /// The run driver over this worker's services and blueprints.
    pub(crate) fn resumer(&self) -> Resumer<'_> {
        Resumer::new(&self.store, &self.coord, &self.blueprints, &self.queue)
    }

    /// Marks a run as executing a node until the returned guard drops.
    pub(crate) fn executing(&self, run_id: &str) -> ExecutingGuard<'_> {
        let mut map = self.executing.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(run_id.to_string()).or_insert(0) += 1;
        ExecutingGuard {
            shared: self,
            run_id: run_id.to_string(),
        }
    }
}

/// See [`Shared::executing`].
pub(crate) struct ExecutingGuard<'a> {
    shared: &'a Shared,
    run_id: String,
}

impl Drop for ExecutingGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .executing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.run_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.run_id);
            }
        }
    }
}
