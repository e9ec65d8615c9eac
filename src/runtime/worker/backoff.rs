//! [`Backoff`]: a worker thread's pause while a service fails.

use std::time::Duration;

/// A worker thread's pause after a service failed, growing while failures go on, so a
/// message is not requeued and retried in a tight loop during an outage.
#[derive(Default)]
pub(super) struct Backoff {
    failing: u32,
}

impl Backoff {
    /// After handling a delivery (or a batch of them): if one is to be retried (`retry`, its
    /// reason), waits 100 ms, 200 ms, … up to 5 s while failures go on — unless the session
    /// is over (`closed`): its deliveries return to the queue anyway. After a success, the
    /// next failure waits the least again.
    pub(super) fn after(&mut self, retry: Option<&str>, closed: bool) {
        match retry {
            Some(reason) if !closed => {
                self.failing = (self.failing + 1).min(7);
                let pause = Duration::from_millis(50 << self.failing).min(Duration::from_secs(5));
                log::warn!("{reason}; retrying in {pause:?}");
                std::thread::sleep(pause);
            }
            Some(_) => {}
            None => self.failing = 0,
        }
    }
}
