//! Group execution: concurrent callers of one statement share one round trip.
//!
//! The first caller to arrive *leads*: it takes the requests queued so far (up to a limit,
//! never two with the same key), runs them as one batch, hands every caller its own result
//! and steps down; the callers that arrived meanwhile form the next batch, led by one of
//! them. A lone caller leads a batch of one at once — no timer, no extra thread, no added
//! hop — so grouping costs nothing without concurrency, and with it divides the round trips,
//! statement overheads and fsyncs among the callers (the technique of database group
//! commit). Worker threads that wait on PostgreSQL or Redis together are exactly such
//! callers.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard};

/// A queue of requests executed in batches by whichever caller leads; see the module docs.
pub(crate) struct Group<Req, Resp> {
    state: Mutex<State<Req, Resp>>,
    finished: Condvar,
    max_batch: usize,
}

struct State<Req, Resp> {
    queue: VecDeque<(u64, Req)>,
    results: HashMap<u64, Resp>,
    leading: bool,
    next_ticket: u64,
}

impl<Req, Resp> Group<Req, Resp> {
    /// A group whose batches hold at most `max_batch` requests.
    pub(crate) fn new(max_batch: usize) -> Self {
        Group {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                results: HashMap::new(),
                leading: false,
                next_ticket: 0,
            }),
            finished: Condvar::new(),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<Req, Resp>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Executes `request` in a batch and returns its response.
    ///
    /// `run` receives a batch and must return one response per request, in order. Requests
    /// for which `key` gives the same `Some` never share a batch. `abandoned` makes the
    /// response of requests whose batch's leader panicked (the panic goes on in the leader).
    pub(crate) fn submit(
        &self,
        request: Req,
        key: impl Fn(&Req) -> Option<&str>,
        run: impl Fn(Vec<Req>) -> Vec<Resp>,
        abandoned: impl Fn() -> Resp,
    ) -> Resp {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket = state.next_ticket.wrapping_add(1);
        state.queue.push_back((ticket, request));
        loop {
            if let Some(response) = state.results.remove(&ticket) {
                return response;
            }
            if state.leading {
                state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Nobody leads: lead a batch (again, if a key conflict left our request out of
            // the last one).
            let (tickets, batch) = self.take_batch(&mut state, &key);
            state.leading = true;
            drop(state);
            let outcome = catch_unwind(AssertUnwindSafe(|| run(batch)));
            state = self.lock();
            state.leading = false;
            match outcome {
                Ok(responses) => {
                    let mut responses = responses.into_iter();
                    for t in tickets {
                        let response = responses.next().unwrap_or_else(&abandoned);
                        state.results.insert(t, response);
                    }
                }
                Err(panic) => {
                    for t in tickets.into_iter().filter(|&t| t != ticket) {
                        state.results.insert(t, abandoned());
                    }
                    // Our own request may still be queued (left out of the batch): nobody
                    // will wait for it, so nobody may run it.
                    state.queue.retain(|(t, _)| *t != ticket);
                    self.finished.notify_all();
                    drop(state);
                    resume_unwind(panic);
                }
            }
            self.finished.notify_all();
        }
    }

    /// Takes the next batch off the queue, oldest first, skipping requests whose key is
    /// already in the batch (they stay queued, in order).
    fn take_batch(
        &self,
        state: &mut State<Req, Resp>,
        key: &impl Fn(&Req) -> Option<&str>,
    ) -> (Vec<u64>, Vec<Req>) {
        let mut tickets = Vec::new();
        let mut batch: Vec<Req> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some((t, request)) = state.queue.pop_front() {
            let conflicts = batch.len() >= self.max_batch
                || key(&request).is_some_and(|k| batch.iter().any(|b| key(b) == Some(k)));
            if conflicts {
                kept.push_back((t, request));
            } else {
                tickets.push(t);
                batch.push(request);
            }
        }
        state.queue = kept;
        (tickets, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[test]
    fn a_lone_caller_runs_a_batch_of_one() {
        let group: Group<u32, u32> = Group::new(8);
        let sizes = Mutex::new(Vec::new());
        for i in 0..3 {
            let r = group.submit(
                i,
                |_| None,
                |batch| {
                    sizes.lock().unwrap().push(batch.len());
                    batch.iter().map(|x| x * 10).collect()
                },
                || 0,
            );
            assert_eq!(r, i * 10);
        }
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1, 1]);
    }

    #[test]
    fn concurrent_callers_share_batches_and_each_gets_its_own_response() {
        let group: Arc<Group<(usize, String), usize>> = Arc::new(Group::new(64));
        let batches = Arc::new(AtomicUsize::new(0));
        let threads = 8;
        let per_thread = 200;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (group, batches, barrier) = (group.clone(), batches.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..per_thread {
                        let n = t * 1_000 + i;
                        // Two keys per thread pair collide now and then.
                        let key = format!("k{}", (t / 2) * 1_000 + i);
                        let r = group.submit(
                            (n, key),
                            |(_, k)| Some(k.as_str()),
                            |batch| {
                                batches.fetch_add(1, Ordering::SeqCst);
                                let mut keys: Vec<&String> = batch.iter().map(|(_, k)| k).collect();
                                keys.sort();
                                keys.dedup();
                                assert_eq!(keys.len(), batch.len(), "a key twice in one batch");
                                batch.iter().map(|(n, _)| n + 1).collect()
                            },
                            || usize::MAX,
                        );
                        assert_eq!(r, n + 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(batches.load(Ordering::SeqCst) <= threads * per_thread);
        assert!(group.lock().queue.is_empty() && group.lock().results.is_empty());
    }

    #[test]
    fn a_panicking_batch_abandons_its_followers_and_the_group_goes_on() {
        let group: Group<u32, Option<u32>> = Group::new(8);
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            group.submit(1, |_| None, |_| panic!("boom"), || None)
        }));
        assert!(panicked.is_err());
        assert!(group.lock().queue.is_empty() && group.lock().results.is_empty());
        assert_eq!(
            group.submit(2, |_| None, |b| b.into_iter().map(Some).collect(), || None),
            Some(2)
        );
    }
}
