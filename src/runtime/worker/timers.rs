//! The worker's timer threads: the heartbeat, which keeps a run whose node runs long from
//! looking stalled; the cancel watcher, which raises the flags of nodes whose run was
//! cancelled and lists the runs stopped lately for read-ahead; and the reconciler's passes.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::runtime::error::{Error, Result};
use crate::runtime::metrics::Metrics;
use crate::runtime::reconciler::Reconciler;

use super::read_ahead::{STOPPED_LIMIT, STOPPED_LOOKBACK, STOPPED_WATCH};
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

/// How often the cancel watcher looks for cancelled runs among those executing a node.
const CANCEL_WATCH: Duration = Duration::from_millis(500);
const _: () = assert!(CANCEL_WATCH.as_millis() % STOPPED_WATCH.as_millis() == 0);

/// Starts the cancel watcher: while nodes execute, it looks every half second for their
/// runs among the cancelled ones, and raises those nodes' cancellation flags (an `exec`
/// node kills its program; a Rust node sees `ctx.cancel.is_cancelled()`). While read-ahead
/// entries may be held, it lists the runs cancelled or failed lately every
/// [`STOPPED_WATCH`] (see [`read_ahead`](super::read_ahead)).
pub(super) fn start_cancel_watcher(
    shared: Arc<Shared>,
    stop: Receiver<()>,
) -> Result<JoinHandle<()>> {
    let every = CANCEL_WATCH.as_millis() / STOPPED_WATCH.as_millis();
    std::thread::Builder::new()
        .name("flowcraft-cancel-watch".into())
        .spawn(move || {
            let mut tick: u128 = 0;
            while !wait_or_stop(&stop, STOPPED_WATCH) {
                tick += 1;
                if tick % every == 0 {
                    let runs = shared.executing_runs();
                    match shared.store.cancelled_among(&runs) {
                        Ok(cancelled) => shared.cancel_executing(&cancelled),
                        Err(e) => log::warn!("cannot look for cancelled runs: {e}"),
                    }
                }
                if shared.read_ahead.watches_stopped() {
                    let listed_at = Instant::now();
                    // (Without a fresh, whole list, entries older than half a second go
                    // unused.)
                    match shared.store.stopped_runs(STOPPED_LOOKBACK, STOPPED_LIMIT) {
                        Ok(runs) if runs.len() < STOPPED_LIMIT as usize => {
                            shared.read_ahead.stopped_listed(listed_at, runs)
                        }
                        Ok(_) => log::debug!("too many runs stopped lately to list"),
                        Err(e) => log::debug!("cannot list the runs stopped lately: {e}"),
                    }
                }
            }
        })
        .map_err(Error::thread("cancel watcher"))
}

/// Starts the reconciler's timer thread: a pass every `every`.
pub(super) fn start_reconciler(
    reconciler: Reconciler,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: Receiver<()>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flowcraft-reconciler".into())
        .spawn(move || reconcile_on_timer(reconciler, every, &metrics, stop))
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
        let runs = shared.executing_runs();
        if let Err(e) = shared.store.touch_many(&runs) {
            log::warn!("heartbeat failed: {e}");
        }
        shared.read_ahead.prune();
    }
}

fn reconcile_on_timer(
    reconciler: Reconciler,
    every: Duration,
    metrics: &Metrics,
    stop: Receiver<()>,
) {
    while !wait_or_stop(&stop, every) {
        let pass = reconciler.run();
        metrics.reconciler_passes.inc();
        if let Ok(stats) = &pass {
            metrics
                .recovered_runs
                .inc_by((stats.reconciled_runs + stats.woken_runs) as u64);
        }
        match pass {
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
