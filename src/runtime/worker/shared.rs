//! [`Shared`]: what every thread of a worker shares — its blueprints, node registry,
//! stores and settings — and the runs it is executing a node of right now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::blueprint::Blueprint;
use crate::engine::node::CancelFlag;
use crate::engine::registry::NodeRegistry;
use crate::runtime::metrics::Metrics;
use crate::runtime::resumer::Resumer;
use crate::services::postgres::store::RunStore;
use crate::services::redis::RedisCoordinationStore;

use super::read_ahead::ReadAhead;

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
    /// Runs with a node executing right now: how many, and the run's cancellation flag
    /// (the heartbeat touches these runs; the cancel watcher raises the flag of a run that
    /// was cancelled).
    pub executing: Mutex<HashMap<String, (usize, CancelFlag)>>,
    /// What the worker counts (`--metrics-listen` serves it).
    pub metrics: Arc<Metrics>,
    /// This process, as the run history names it: `host:pid`.
    pub worker_name: String,
    /// Whether node executions are recorded in the run history.
    pub record_history: bool,
    /// Successors' run state, read while the broker delivers them.
    pub read_ahead: ReadAhead,
}

/// `host:pid` of this process.
pub(crate) fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

impl Shared {
    /// The run driver over this worker's services and blueprints.
    pub(crate) fn resumer(&self) -> Resumer<'_> {
        Resumer::new(&self.store, &self.coord, &self.blueprints, &self.queue)
            .observed(&self.metrics, self.registry.events())
    }

    /// Marks a run as executing a node until the returned guard drops; the guard holds the
    /// run's cancellation flag.
    pub(crate) fn executing(&self, run_id: &str) -> ExecutingGuard<'_> {
        let mut map = self.executing.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(run_id.to_string())
            .or_insert_with(|| (0, CancelFlag::new()));
        entry.0 += 1;
        ExecutingGuard {
            shared: self,
            run_id: run_id.to_string(),
            cancel: entry.1.clone(),
        }
    }

    /// The runs with a node executing right now.
    pub(crate) fn executing_runs(&self) -> Vec<String> {
        let map = self.executing.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// Raises the cancellation flags of these runs' executing nodes.
    pub(crate) fn cancel_executing(&self, runs: &[String]) {
        let map = self.executing.lock().unwrap_or_else(|p| p.into_inner());
        for run in runs {
            if let Some((_, flag)) = map.get(run) {
                log::info!("run {run}: cancelled; stopping its executing nodes");
                flag.cancel();
            }
        }
    }
}

/// See [`Shared::executing`].
pub(crate) struct ExecutingGuard<'a> {
    shared: &'a Shared,
    run_id: String,
    cancel: CancelFlag,
}

impl ExecutingGuard<'_> {
    /// The run's cancellation flag.
    pub(crate) fn cancel(&self) -> &CancelFlag {
        &self.cancel
    }
}

impl Drop for ExecutingGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .executing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = map.get_mut(&self.run_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.run_id);
            }
        }
    }
}
