//! The worker's timer threads: the heartbeat, which keeps a run whose node runs long from
//! looking stalled, and the reconciler's passes.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::runtime::error::{Error, Result};
use crate::runtime::reconciler::Reconciler;

use super::shared::Shared;

/// Starts the heartbeat: every third of `stalled_after` (1 s to 60 s) it touches the runs
/// with a node executing, so the reconciler does not take them for stalled.
pub(super) fn start_heartbeat(
    shared: Arc<Shared>,
    stalled_after: Duration,
    stop: Receiver<()>,
) -> Result<JoinHandle<()>> {
    let every = (stalled_after / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
    std::thread::Builder::new()
        .name("flowcraft-heartbeat".into())
        .spawn(move || heartbeat(&shared, every, &stop))
        .map_err(Error::thread("heartbeat"))
}

/// Starts the reconciler's timer thread: a pass every `every`.
pub(super) fn start_reconciler(
    reconciler: Reconciler,
    every: Duration,
    stop: Receiver<()>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flowcraft-reconciler".into())
        .spawn(move || reconcile_on_timer(reconciler, every, stop))
        .map_err(Error::thread("reconciler"))
}

/// Waits for `timeout` unless a stop request comes first; returns whether to stop.
pub(super) fn wait_or_stop(stop: &Receiver<()>, timeout: Duration) -> bool {
    !matches!(
        stop.recv_timeout(timeout),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    )
}

fn heartbeat(shared: &Shared, every: Duration, stop: &Receiver<()>) {
    while !wait_or_stop(stop, every) {
        let runs: Vec<String> = {
            let map = shared.executing.lock().unwrap_or_else(|p| p.into_inner());
            map.keys().cloned().collect()
        };
        if let Err(e) = shared.store.touch_many(&runs) {
            log::warn!("heartbeat failed: {e}");
        }
    }
}

fn reconcile_on_timer(reconciler: Reconciler, every: Duration, stop: Receiver<()>) {
    while !wait_or_stop(&stop, every) {
        match reconciler.run() {
            Ok(stats) if stats.stalled_runs > 0 || stats.woken_runs > 0 => log::info!(
                "reconciler: {} stalled, {} reconciled, {} awaiting runs woken, {} failed",
                stats.stalled_runs,
                stats.reconciled_runs,
                stats.woken_runs,
                stats.failed_runs
            ),
            Ok(_) => {}
            Err(e) => log::warn!("reconciler pass failed: {e}"),
        }
    }
}
