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
//!
//! When a batch fails as a whole, the group decides who gets which error: a lone request
//! gets it as it is; if no request could succeed alone ([`GroupError::fails_every_request`]:
//! the connection is gone) every caller gets it at once; otherwise (a bad row, a failing
//! script) each request runs again alone, so one bad request fails only its own caller.
//!
//! Waiting callers sleep until their own answer is in, each woken alone (thread park and
//! unpark): a finished batch wakes its callers and, if requests are queued, one of them to
//! lead next — never the whole queue.
//!
//! Under load a leader waits a moment for the batch to fill (the idea of PostgreSQL's
//! `commit_delay`): when the last batch held several requests and fewer are queued now, it
//! yields for at most [`GATHER_WAIT`], or until as many are queued as the last batch held.
//! (When no other thread is ready to run, yielding returns at once: the wait is a spin.) A
//! lone caller waits at most once, right after a burst: its batches hold one request, so the
//! next ones do not wait.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// The longest a leader waits for its batch to fill (see the module docs). Measured on
/// `chain5` at 8 threads (median of 4–6 interleaved runs): no wait 4 056 jobs/s, 50 µs
/// 4 372, 100 µs 4 518–4 561, 200 µs 4 479, 400 µs 4 583; waiting the whole time instead of
/// until the last batch's size is queued, 4 255. One thread and 16 threads do not change.
pub(crate) const GATHER_WAIT: Duration = Duration::from_micros(100);

/// The error of a grouped call.
pub(crate) trait GroupError: Display + Sized {
    /// Whether this failure of a whole batch leaves none of its requests a chance alone.
    fn fails_every_request(&self) -> bool;
    /// The error another caller of a failed (or abandoned) batch gets.
    fn for_caller(reason: String) -> Self;
}

/// A queue of requests executed in batches by whichever caller leads; see the module docs.
pub(crate) struct Group<Req, T, E> {
    state: Mutex<State<Req, Result<T, E>>>,
    max_batch: usize,
    /// The queue's length, readable without the lock by a leader waiting for it to grow.
    queued: AtomicUsize,
}

/// A queued request: its ticket, the request, and the caller's thread (to wake it).
struct Queued<Req> {
    ticket: u64,
    request: Req,
    caller: Thread,
}

struct State<Req, Resp> {
    queue: VecDeque<Queued<Req>>,
    results: HashMap<u64, Resp>,
    leading: bool,
    next_ticket: u64,
    /// How many requests the last batch held.
    last_batch: usize,
}

impl<Req, T, E: GroupError> Group<Req, T, E> {
    /// A group whose batches hold at most `max_batch` requests.
    pub(crate) fn new(max_batch: usize) -> Self {
        Group {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                results: HashMap::new(),
                leading: false,
                next_ticket: 0,
                last_batch: 0,
            }),
            max_batch: max_batch.max(1),
            queued: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<Req, Result<T, E>>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Executes `request` in a batch and returns its result.
    ///
    /// `run` executes a batch: one result per request, in order, or the error of the whole
    /// batch. Requests for which `key` gives the same `Some` never share a batch. If the
    /// leader panics, the panic goes on in the leader and the others get an error.
    pub(crate) fn submit(
        &self,
        request: Req,
        key: impl Fn(&Req) -> Option<&str>,
        run: impl Fn(&[Req]) -> Result<Vec<Result<T, E>>, E>,
    ) -> Result<T, E> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket = state.next_ticket.wrapping_add(1);
        state.queue.push_back(Queued {
            ticket,
            request,
            caller: thread::current(),
        });
        self.queued.store(state.queue.len(), Ordering::Release);
        loop {
            if let Some(response) = state.results.remove(&ticket) {
                return response;
            }
            if state.leading {
                // Woken when our answer is in, or to lead; a spurious wake-up loops.
                drop(state);
                thread::park();
                state = self.lock();
                continue;
            }
            // Nobody leads: lead a batch (again, if a key conflict left our request out of
            // the last one).
            let expected = state.last_batch.min(self.max_batch);
            if expected > 1 && state.queue.len() < expected {
                state.leading = true;
                drop(state);
                self.wait_to_fill(expected);
                state = self.lock();
            }
            let (tickets, callers, batch) = self.take_batch(&mut state, &key);
            state.last_batch = batch.len();
            state.leading = true;
            drop(state);
            let outcome = catch_unwind(AssertUnwindSafe(|| run_batch(&batch, &run)));
            state = self.lock();
            state.leading = false;
            let panic = match outcome {
                Ok(responses) => {
                    for (t, response) in tickets.into_iter().zip(responses) {
                        state.results.insert(t, response);
                    }
                    None
                }
                Err(panic) => {
                    for t in tickets.into_iter().filter(|&t| t != ticket) {
                        let abandoned = E::for_caller("the thread running it panicked".into());
                        state.results.insert(t, Err(abandoned));
                    }
                    // Our own request may still be queued (left out of the batch): nobody
                    // will wait for it, so nobody may run it.
                    state.queue.retain(|q| q.ticket != ticket);
                    self.queued.store(state.queue.len(), Ordering::Release);
                    Some(panic)
                }
            };
            // Wake the batch's callers, and the oldest queued one to lead the next batch
            // (unless that is us: we loop and lead it).
            let next_leader = state
                .queue
                .front()
                .filter(|q| q.ticket != ticket)
                .map(|q| q.caller.clone());
            drop(state);
            for caller in callers.iter().chain(&next_leader) {
                if caller.id() != thread::current().id() {
                    caller.unpark();
                }
            }
            if let Some(panic) = panic {
                resume_unwind(panic);
            }
            state = self.lock();
        }
    }

    /// Yields until `expected` requests are queued, for at most [`GATHER_WAIT`].
    fn wait_to_fill(&self, expected: usize) {
        let until = Instant::now() + GATHER_WAIT;
        while self.queued.load(Ordering::Acquire) < expected && Instant::now() < until {
            thread::yield_now();
        }
    }

    /// Takes the next batch off the queue ([`take_batch`]): its tickets, callers and
    /// requests.
    fn take_batch(
        &self,
        state: &mut State<Req, Result<T, E>>,
        key: &impl Fn(&Req) -> Option<&str>,
    ) -> (Vec<u64>, Vec<Thread>, Vec<Req>) {
        let taken = take_batch(&mut state.queue, self.max_batch, |q| key(&q.request));
        self.queued.store(state.queue.len(), Ordering::Release);
        let mut batch = (Vec::new(), Vec::new(), Vec::new());
        for queued in taken {
            batch.0.push(queued.ticket);
            batch.1.push(queued.caller);
            batch.2.push(queued.request);
        }
        batch
    }
}

/// A queue of requests that their callers hand off: whichever caller finds nobody leading
/// runs the queued requests in batches (and deals with their results itself), and every
/// other caller goes on at once, without waiting for its request.
///
/// This is [`Group`] without the wait: a worker thread hands off the tail of its job (commit,
/// Redis, publish, ack) and takes its next job, so a process keeps more jobs in flight than
/// it has threads, and the batches grow with them.
pub(crate) struct Combiner<Req> {
    state: Mutex<CombinerState<Req>>,
    max_batch: usize,
}

struct CombinerState<Req> {
    queue: VecDeque<Req>,
    leading: bool,
}

impl<Req> Combiner<Req> {
    /// A combiner whose batches hold at most `max_batch` requests.
    pub(crate) fn new(max_batch: usize) -> Self {
        Combiner {
            state: Mutex::new(CombinerState {
                queue: VecDeque::new(),
                leading: false,
            }),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CombinerState<Req>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many requests wait for the leader.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Queues `request`. If another caller leads, returns at once: that one runs it. Otherwise
    /// this caller leads: it runs the queue with `run` in batches (oldest first, at most
    /// `max_batch`, never two requests with the same `Some` key) until the queue is empty,
    /// and returns then. A panic in `run` goes on in the leader; the next caller leads.
    pub(crate) fn hand_off(
        &self,
        request: Req,
        key: impl Fn(&Req) -> Option<&str>,
        mut run: impl FnMut(Vec<Req>),
    ) {
        let mut state = self.lock();
        state.queue.push_back(request);
        if state.leading {
            return;
        }
        state.leading = true;
        // Steps down if `run` panics.
        struct Resign<'a, Req>(&'a Combiner<Req>);
        impl<Req> Drop for Resign<'_, Req> {
            fn drop(&mut self) {
                self.0.lock().leading = false;
            }
        }
        drop(state);
        let resign = Resign(self);
        loop {
            let mut state = self.lock();
            let batch = take_batch(&mut state.queue, self.max_batch, &key);
            if batch.is_empty() {
                // Under the lock: a request queued from now on finds nobody leading (and
                // may lead at once, so `resign` must not step down again later).
                state.leading = false;
                drop(state);
                std::mem::forget(resign);
                return;
            }
            drop(state);
            run(batch);
        }
    }
}

/// Takes the next batch off `queue`, oldest first: at most `max` items, never two whose
/// `key` is the same `Some` (the ones left out stay queued, in order).
fn take_batch<Q>(queue: &mut VecDeque<Q>, max: usize, key: impl Fn(&Q) -> Option<&str>) -> Vec<Q> {
    let mut batch: Vec<Q> = Vec::new();
    let mut kept = VecDeque::new();
    while let Some(item) = queue.pop_front() {
        let conflicts = batch.len() >= max
            || key(&item).is_some_and(|k| batch.iter().any(|b| key(b) == Some(k)));
        if conflicts {
            kept.push_back(item);
        } else {
            batch.push(item);
        }
    }
    *queue = kept;
    batch
}

/// Runs a batch and applies the failure rules of the module docs: exactly one result per
/// request (an empty batch does not run).
pub(crate) fn run_batch<Req, T, E: GroupError>(
    batch: &[Req],
    run: &impl Fn(&[Req]) -> Result<Vec<Result<T, E>>, E>,
) -> Vec<Result<T, E>> {
    if batch.is_empty() {
        // Nothing to run (and no round trip for it).
        return Vec::new();
    }
    let missing = || E::for_caller("the batch returned no result for this request".into());
    match run(batch) {
        Ok(mut results) => {
            results.truncate(batch.len());
            while results.len() < batch.len() {
                results.push(Err(missing()));
            }
            results
        }
        Err(e) if batch.len() == 1 => vec![Err(e)],
        Err(e) if e.fails_every_request() => {
            let reason = e.to_string();
            batch
                .iter()
                .map(|_| Err(E::for_caller(reason.clone())))
                .collect()
        }
        Err(_) => batch
            .iter()
            .map(|one| match run(std::slice::from_ref(one)) {
                Ok(mut results) if !results.is_empty() => results.swap_remove(0),
                Ok(_) => Err(missing()),
                Err(e) => Err(e),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[derive(Debug, PartialEq)]
    struct TestError {
        reason: String,
        every: bool,
    }

    impl Display for TestError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.reason)
        }
    }

    impl GroupError for TestError {
        fn fails_every_request(&self) -> bool {
            self.every
        }
        fn for_caller(reason: String) -> Self {
            TestError {
                reason,
                every: false,
            }
        }
    }

    fn error(reason: &str, every: bool) -> TestError {
        TestError {
            reason: reason.into(),
            every,
        }
    }

    #[test]
    fn an_empty_batch_does_not_run() {
        let results: Vec<Result<u32, TestError>> =
            run_batch(&[], &|_: &[u32]| panic!("an empty batch ran"));
        assert!(results.is_empty());
    }

    #[test]
    fn a_lone_hand_off_runs_at_once_in_the_caller() {
        let combiner: Combiner<u32> = Combiner::new(8);
        let mut ran = Vec::new();
        for i in 0..3 {
            combiner.hand_off(i, |_| None, |batch| ran.push(batch));
        }
        assert_eq!(ran, vec![vec![0], vec![1], vec![2]]);
        assert!(!combiner.lock().leading && combiner.lock().queue.is_empty());
    }

    /// Runs `work(thread, i)` for `per_thread` values of `i` on `threads` threads released
    /// together, and waits for them all.
    fn on_threads(
        threads: usize,
        per_thread: usize,
        work: impl Fn(usize, usize) + Send + Sync + 'static,
    ) {
        let barrier = Arc::new(Barrier::new(threads));
        let work = Arc::new(work);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (barrier.clone(), work.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..per_thread).for_each(|i| work(t, i));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// The request of thread `t`, call `i`: its number, and a key that the other thread of
    /// its pair uses too (so keys collide now and then).
    fn request(t: usize, i: usize) -> (usize, String) {
        (t * 1_000 + i, format!("k{}", (t / 2) * 1_000 + i))
    }

    #[test]
    fn handed_off_requests_all_run_once_never_two_keys_in_a_batch() {
        let (threads, per_thread) = (8, 300);
        let combiner: Arc<Combiner<(usize, String)>> = Arc::new(Combiner::new(16));
        let ran = Arc::new(Mutex::new(Vec::new()));
        let (shared, ran_by) = (combiner.clone(), ran.clone());
        on_threads(threads, per_thread, move |t, i| {
            shared.hand_off(
                request(t, i),
                |(_, k)| Some(k.as_str()),
                |batch| {
                    assert!(batch.len() <= 16);
                    let mut keys: Vec<&String> = batch.iter().map(|(_, k)| k).collect();
                    keys.sort();
                    keys.dedup();
                    assert_eq!(keys.len(), batch.len(), "a key twice in one batch");
                    ran_by.lock().unwrap().extend(batch.iter().map(|(n, _)| *n));
                },
            );
        });
        let mut ran = ran.lock().unwrap().clone();
        ran.sort();
        let expected: Vec<usize> = (0..threads)
            .flat_map(|t| (0..per_thread).map(move |i| request(t, i).0))
            .collect();
        assert_eq!(ran, expected, "a request ran twice or never");
        assert!(!combiner.lock().leading && combiner.lock().queue.is_empty());
    }

    #[test]
    fn a_leader_that_panics_steps_down_and_the_next_caller_leads() {
        let combiner: Combiner<u32> = Combiner::new(8);
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            combiner.hand_off(1, |_| None, |_| panic!("boom"))
        }));
        assert!(panicked.is_err());
        let mut ran = Vec::new();
        combiner.hand_off(2, |_| None, |batch| ran.extend(batch));
        assert_eq!(ran, vec![2]);
    }

    #[test]
    fn a_lone_caller_runs_a_batch_of_one() {
        let group: Group<u32, u32, TestError> = Group::new(8);
        let sizes = Mutex::new(Vec::new());
        for i in 0..3 {
            let r = group.submit(
                i,
                |_| None,
                |batch| {
                    sizes.lock().unwrap().push(batch.len());
                    Ok(batch.iter().map(|x| Ok(x * 10)).collect())
                },
            );
            assert_eq!(r, Ok(i * 10));
        }
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1, 1]);
    }

    #[test]
    fn concurrent_callers_share_batches_and_each_gets_its_own_response() {
        let (threads, per_thread) = (8, 200);
        let group: Arc<Group<(usize, String), usize, TestError>> = Arc::new(Group::new(64));
        let batches = Arc::new(AtomicUsize::new(0));
        let (shared, counted) = (group.clone(), batches.clone());
        on_threads(threads, per_thread, move |t, i| {
            let (n, key) = request(t, i);
            let r = shared.submit(
                (n, key),
                |(_, k)| Some(k.as_str()),
                |batch| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut keys: Vec<&String> = batch.iter().map(|(_, k)| k).collect();
                    keys.sort();
                    keys.dedup();
                    assert_eq!(keys.len(), batch.len(), "a key twice in one batch");
                    Ok(batch.iter().map(|(n, _)| Ok(n + 1)).collect())
                },
            );
            assert_eq!(r, Ok(n + 1));
        });
        assert!(batches.load(Ordering::SeqCst) <= threads * per_thread);
        assert!(group.lock().queue.is_empty() && group.lock().results.is_empty());
    }

    #[test]
    fn a_panicking_batch_abandons_its_followers_and_the_group_goes_on() {
        let group: Group<u32, u32, TestError> = Group::new(8);
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            group.submit(1, |_| None, |_| panic!("boom"))
        }));
        assert!(panicked.is_err());
        assert!(group.lock().queue.is_empty() && group.lock().results.is_empty());
        assert_eq!(
            group.submit(2, |_| None, |b| Ok(b.iter().map(|&x| Ok(x)).collect())),
            Ok(2)
        );
    }

    #[test]
    fn a_failed_batch_fails_a_lone_request_as_it_is() {
        let results = run_batch(&[1u32], &|_: &[u32]| -> Result<Vec<Result<u32, _>>, _> {
            Err(error("row 1 is bad", false))
        });
        assert_eq!(results, vec![Err(error("row 1 is bad", false))]);
    }

    #[test]
    fn a_lost_connection_fails_every_request_at_once() {
        let calls = AtomicUsize::new(0);
        let results = run_batch(
            &[1u32, 2, 3],
            &|_: &[u32]| -> Result<Vec<Result<u32, _>>, _> {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(error("connection lost", true))
            },
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no request ran again alone"
        );
        assert_eq!(
            results,
            (0..3)
                .map(|_| Err(error("connection lost", false)))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_bad_request_fails_only_itself() {
        let results = run_batch(&[1u32, 2, 3], &|batch: &[u32]| {
            if batch.contains(&2) {
                return Err(error("row 2 is bad", false));
            }
            Ok(batch.iter().map(|&x| Ok(x * 10)).collect())
        });
        assert_eq!(
            results,
            vec![Ok(10), Err(error("row 2 is bad", false)), Ok(30)]
        );
    }

    #[test]
    fn a_short_answer_fails_the_requests_it_left_out() {
        let results = run_batch(&[1u32, 2], &|_: &[u32]| Ok::<_, TestError>(vec![Ok(7)]));
        assert_eq!(results[0], Ok(7));
        assert!(results[1].is_err());
    }
}
