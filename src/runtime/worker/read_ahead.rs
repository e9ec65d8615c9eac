//! A successor's run state, read while the broker delivers it.
//!
//! A sequential run spends each hop in turn on the broker (publish, deliver) and on
//! PostgreSQL (the next job's load, its commit). When a tail batch publishes a few
//! successors and no delivery waits for a worker thread (a backlog would hold the
//! successors' deliveries back, and worker threads load in parallel anyway), the leading
//! thread reserves an entry for each before publishing and then loads, in one
//! statement, the keys each successor's job would load
//! ([`expected_reads`](crate::runtime::reads::expected_reads)); the worker
//! thread that receives the successor takes that snapshot instead of loading again, waiting
//! for it if the load is still under way. So the load overlaps the delivery.
//!
//! Taking the snapshot is the same as loading a little earlier: it was read after the
//! predecessor's commit, each entry is taken once, and anything committed since is what a
//! job's own load could have missed too (the guard's commit, not its load, makes a node's
//! first commit win). Only a first delivery takes an entry: a redelivery, or the
//! reconciler's copy, may come after a commit whose consumer died before coordinating it,
//! and must see that commit to coordinate it; it discards the entry and loads.
//!
//! Most successors need no statement at all: in a chain, what a successor's job loads — the
//! run's header and awaiting keys, its own output (absent) and its input — is what its only
//! predecessor read and commits ([`derive`]). The leading thread stores that for each such
//! successor once the commit applied, whether or not the batch reads ahead, if the commit
//! statement's snapshot saw the run running (it returns the run's status): the same as
//! loading as of that snapshot. A backlog holds a successor's delivery back for seconds, so
//! such an entry lives [`DERIVED_LIFETIME`] (a loaded one [`LIFETIME`]). The awaiting keys
//! are as the predecessor loaded them; a job reads them only to tell whether its own node is
//! awaited, which a node that never ran is not.
//!
//! But a run cancelled or failed after an entry was made must not go on for seconds: a load
//! would see its status, and the spec acks such a run's queued jobs without executing them.
//! So, while entries are held, the cancel watcher lists the runs cancelled or failed lately
//! every [`STOPPED_WATCH`], and an entry is taken only if its run is not on the list and
//! either the entry is younger than [`STOPPED_FRESH`] (counted from the start of the
//! statement it comes from) or the last list began less than that ago. A run cancelled or
//! failed more than half a second before the delivery is seen; one stopped since runs at
//! most that one successor, whose own commit then sees the status (the chain stops at the
//! next hop). Without a fresh list (PostgreSQL slow or unreachable, or more than
//! [`STOPPED_LIMIT`] runs stopped lately), an older entry is left unused and its delivery
//! loads. (A `completed` run is not listed: it cannot complete while a successor of it is
//! queued.)
//!
//! A successor delivered to another process leaves its entry unused; it expires (the
//! heartbeat drops expired entries too), and when most entries expire (several workers
//! share the queue) this process reads ahead only now and then, to notice when that
//! changes. A leader that panics between reserving and loading leaves its entries
//! reserved: their deliveries wait [`WAIT`] once, then load on their own.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

use serde_json::Value;

use crate::engine::blueprint::Blueprint;
use crate::engine::node::{ContextMap, ContextView};
use crate::runtime::message::JobPayload;
use crate::runtime::reads::{expected_reads, run_keys};
use crate::runtime::scheduling::NextJob;
use crate::services::postgres::store::{NodeCommit, RunSnapshot};
use crate::services::redis::JoinRule;
use crate::vocabulary::keys::{input_key, output_key, HEADER_KEYS};
use crate::vocabulary::RunStatus;

/// Most successors one tail batch reads ahead; a bigger fan-out's workers load their own.
pub(super) const MAX_PER_BATCH: usize = 16;
/// Most entries held at once for loads (reserved or loaded).
const CAPACITY: usize = 1_024;
/// Most derived entries held at once, apart from those for loads: a backlog delays each
/// successor's delivery behind thousands of others, and a derived entry costs no statement.
const DERIVED_CAPACITY: usize = 4_096;
/// Largest state (in bytes, roughly) a derived entry holds: a successor with more is loaded
/// by its delivery, so that entries stay small.
const MAX_DERIVED_BYTES: usize = 8_192;
/// How long an entry waits for its delivery.
const LIFETIME: Duration = Duration::from_secs(2);
/// How long a derived entry waits for its delivery (a backlog holds deliveries back).
const DERIVED_LIFETIME: Duration = Duration::from_secs(5);
/// An entry older than this is taken only while the list of runs stopped lately is this
/// fresh (see the module docs): a run cancelled or failed since the entry's snapshot is
/// missed for at most this long.
const STOPPED_FRESH: Duration = Duration::from_millis(500);
/// How often the runs stopped lately are listed, while entries may be held.
pub(super) const STOPPED_WATCH: Duration = Duration::from_millis(250);
/// How far back that list goes: beyond any entry's lifetime.
pub(super) const STOPPED_LOOKBACK: Duration = Duration::from_secs(10);
/// Most runs that list holds: a longer one (a storm of failures) is not taken, and entries
/// older than [`STOPPED_FRESH`] then go unused.
pub(super) const STOPPED_LIMIT: i64 = 10_000;
/// How long a delivery waits for a load under way before loading on its own.
const WAIT: Duration = Duration::from_millis(100);
/// How often expired entries are dropped (and counted unused).
const PRUNE_EVERY: Duration = Duration::from_millis(250);
/// While reads ahead are mostly unused, one batch in this many still reads ahead.
const PROBE_EVERY: u64 = 32;

/// A job whose delivery an entry is for: run, node, iteration.
pub(super) type JobKey = (String, String, u32);

/// An entry, with the instant it expires.
enum Entry {
    /// Reserved; its load is under way.
    Loading(Instant),
    /// Loaded or derived, with the keys its job loads.
    Ready(Ready),
}

/// A snapshot ready for its delivery.
struct Ready {
    /// When it was loaded or derived.
    at: Instant,
    /// Whether it was derived (else loaded).
    derived: bool,
    expires: Instant,
    keys: Vec<String>,
    snapshot: RunSnapshot,
}

impl Entry {
    fn expires(&self) -> Instant {
        match self {
            Entry::Loading(t) => *t,
            Entry::Ready(ready) => ready.expires,
        }
    }
}

/// The entries held, and how many of them are derived: loads and derived entries are bounded
/// apart, so that a backlog's derived entries leave room for loads.
#[derive(Default)]
struct Held {
    map: HashMap<JobKey, Entry>,
    derived: usize,
}

impl Held {
    /// The entries for loads, reserved or loaded.
    fn loads(&self) -> usize {
        self.map.len() - self.derived
    }

    fn remove(&mut self, job: &JobKey) -> Option<Entry> {
        let entry = self.map.remove(job);
        if matches!(&entry, Some(Entry::Ready(r)) if r.derived) {
            self.derived -= 1;
        }
        entry
    }

    /// Drops the entries expired `now`; returns how many went.
    fn drop_expired(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| now < e.expires());
        self.derived = self
            .map
            .values()
            .filter(|e| matches!(e, Entry::Ready(r) if r.derived))
            .count();
        before - self.map.len()
    }
}

/// The runs cancelled or failed lately, as last listed.
#[derive(Default)]
struct Stopped {
    /// When the last list began (none yet: no entry older than [`STOPPED_FRESH`] is
    /// taken).
    listed_at: Option<Instant>,
    runs: HashSet<String>,
}

/// A successor's run state worked out from its predecessor's commit (see the module docs):
/// the keys its job loads, and their values.
pub(super) struct Derived {
    job: JobKey,
    keys: Vec<String>,
    context: ContextMap,
}

/// The state that `next`, a successor of node `from`, would load right after the commit of
/// `from` in run `run_id` — `from` having read `view` (with its own writes) and committing
/// `commit` — if that commit alone decides it: `next` is ready at once and never repeats,
/// `from` is its only predecessor (nobody else writes its input) and it stands in for no
/// node (whose commit would write its output), its job loads only the run's header and
/// awaiting keys (which `from` loaded too), its own output (absent: it never ran) and its
/// input (what the commit writes), and the commit writes none of those but the input and
/// header keys. `None` otherwise, or when the state would take more than about
/// [`MAX_DERIVED_BYTES`].
pub(super) fn derive(
    bp: &Blueprint,
    from: usize,
    run_id: &str,
    view: &ContextView,
    commit: &NodeCommit,
    next: &NextJob,
) -> Option<Derived> {
    let report = &next.report;
    if report.rule != JoinRule::Immediate || report.iteration != 0 {
        return None;
    }
    let input = next.input.as_ref()?;
    let target = bp.node_index(&report.node)?;
    if !bp.feeds_alone(from, target) {
        return None;
    }
    let keys = expected_reads(Some(bp), &report.node);
    let (output, input_name) = (output_key(&report.node), input_key(&report.node));
    let decided = |k: &String| *k == output || *k == input_name || run_keys().any(|r| r == k);
    if !keys.iter().all(decided) {
        return None;
    }
    // The store keeps or drops some writes of these keys (a node's own writes of the
    // awaiting keys, a deletion beside the input's write): where the commit writes any but
    // the input and header keys, its successor loads.
    let own_write = |k: &str| !(k == input_name || HEADER_KEYS.contains(&k));
    if commit.delete.iter().any(|k| keys.contains(k))
        || keys
            .iter()
            .any(|k| own_write(k) && commit.set.contains_key(k))
    {
        return None;
    }
    let mut budget = MAX_DERIVED_BYTES;
    let mut context = ContextMap::new();
    let values = run_keys().filter_map(|key| {
        // (The first job's commit stamps the header keys, which its view lacks.)
        let value = commit.set.get(key).or_else(|| view.get(key))?;
        Some((key.to_string(), value))
    });
    for (key, value) in values.chain(std::iter::once((input_name, input))) {
        if !fits(value, &mut budget) {
            return None;
        }
        context.insert(key, value.clone());
    }
    Some(Derived {
        job: (run_id.to_string(), report.node.clone(), 0),
        keys,
        context,
    })
}

/// Whether `value` takes at most `budget` bytes or so (32 for each value and each key, plus
/// the length of each string), spending the budget.
fn fits(value: &Value, budget: &mut usize) -> bool {
    let spend = |budget: &mut usize, text: &str| {
        budget
            .checked_sub(32 + text.len())
            .map(|left| *budget = left)
            .is_some()
    };
    let text = match value {
        Value::String(s) => s.as_str(),
        _ => "",
    };
    spend(budget, text)
        && match value {
            Value::Array(items) => items.iter().all(|v| fits(v, budget)),
            Value::Object(map) => map.iter().all(|(k, v)| spend(budget, k) && fits(v, budget)),
            _ => true,
        }
}

/// The entries of one worker process.
#[derive(Default)]
pub(crate) struct ReadAhead {
    entries: Mutex<Held>,
    /// When expired entries were last dropped.
    pruned: Mutex<Option<Instant>>,
    loaded: Condvar,
    /// The runs stopped lately (see the module docs).
    stopped: Mutex<Stopped>,
    /// Entries taken by their delivery, and entries that expired unused (both halved now
    /// and then, so that they follow a change of workload).
    used: AtomicU64,
    unused: AtomicU64,
    batches: AtomicU64,
    /// The worker's `flowcraft_read_ahead_total`, if counted.
    counted: Option<IntCounterVec>,
}

impl ReadAhead {
    /// Read-ahead whose entries are counted, used or not, in `counter` (by `outcome`).
    pub(crate) fn counted_in(counter: IntCounterVec) -> ReadAhead {
        ReadAhead {
            counted: Some(counter),
            ..ReadAhead::default()
        }
    }

    /// Whether a batch should read ahead now: while at least half of the entries are used,
    /// always; else one batch in [`PROBE_EVERY`].
    pub(super) fn worthwhile(&self) -> bool {
        let (used, unused) = (
            self.used.load(Ordering::Relaxed),
            self.unused.load(Ordering::Relaxed),
        );
        used >= unused || self.batches.fetch_add(1, Ordering::Relaxed) % PROBE_EVERY == 0
    }

    /// Reserves entries for these jobs, before they are published; returns those reserved
    /// (not those already reserved, nor any beyond the capacity). Expired entries go.
    pub(super) fn reserve(&self, jobs: Vec<JobKey>) -> Vec<JobKey> {
        let now = Instant::now();
        if self.lock().loads() + MAX_PER_BATCH > CAPACITY || self.prune_due(now) {
            self.prune();
        }
        let mut entries = self.lock();
        let mut reserved = Vec::with_capacity(jobs.len());
        for job in jobs {
            if entries.loads() >= CAPACITY || entries.map.contains_key(&job) {
                continue;
            }
            entries
                .map
                .insert(job.clone(), Entry::Loading(now + LIFETIME));
            reserved.push(job);
        }
        reserved
    }

    /// Stores what was loaded, by a statement that began `at`, for a reserved job (`None`: the
    /// load failed, and its delivery loads on its own), and wakes the deliveries waiting for
    /// it.
    pub(super) fn fill(&self, loads: Vec<(JobKey, Vec<String>, Option<RunSnapshot>)>, at: Instant) {
        let mut entries = self.lock();
        for (job, keys, snapshot) in loads {
            match snapshot {
                Some(snapshot) => {
                    if let Some(entry @ Entry::Loading(_)) = entries.map.get_mut(&job) {
                        *entry = Entry::Ready(Ready {
                            at,
                            derived: false,
                            expires: entry.expires(),
                            keys,
                            snapshot,
                        });
                    }
                }
                None => {
                    entries.remove(&job);
                }
            }
        }
        drop(entries);
        self.loaded.notify_all();
    }

    /// Stores the state [derived](derive) from a commit, by a statement that began `at` and
    /// saw its run running, for successors about to be published (not over an entry already
    /// there, nor beyond [`DERIVED_CAPACITY`]).
    pub(super) fn put(&self, derived: Vec<Derived>, at: Instant) {
        if derived.is_empty() {
            return;
        }
        if self.prune_due(Instant::now()) {
            self.prune();
        }
        let mut entries = self.lock();
        let mut stored = 0;
        for d in derived {
            if entries.derived >= DERIVED_CAPACITY {
                break;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = entries.map.entry(d.job) {
                let snapshot = RunSnapshot {
                    context: d.context,
                    status: Some(RunStatus::Running),
                };
                slot.insert(Entry::Ready(Ready {
                    at,
                    derived: true,
                    expires: at + DERIVED_LIFETIME,
                    keys: d.keys,
                    snapshot,
                }));
                entries.derived += 1;
                stored += 1;
            }
        }
        drop(entries);
        if let (Some(counter), true) = (&self.counted, stored > 0) {
            counter.with_label_values(&["derived"]).inc_by(stored);
        }
    }

    /// The snapshot loaded for this job, and the keys it holds, if an entry is there (waiting
    /// for a load under way); the entry is gone afterwards.
    pub(super) fn take(&self, job: &JobKey) -> Option<(Vec<String>, RunSnapshot)> {
        let deadline = Instant::now() + WAIT;
        let mut entries = self.lock();
        loop {
            match entries.map.get(job) {
                None => return None,
                Some(Entry::Ready(_)) => {
                    let now = Instant::now();
                    let (keys, snapshot) = match entries.remove(job) {
                        Some(Entry::Ready(r)) if self.usable(&job.0, r.at, r.expires, now) => {
                            (r.keys, r.snapshot)
                        }
                        _ => {
                            self.count_unused(1);
                            return None;
                        }
                    };
                    self.used.fetch_add(1, Ordering::Relaxed);
                    if let Some(counter) = &self.counted {
                        counter.with_label_values(&["used"]).inc();
                    }
                    return Some((keys, snapshot));
                }
                Some(Entry::Loading(_)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        entries.remove(job);
                        return None;
                    }
                    entries = self
                        .loaded
                        .wait_timeout(entries, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Whether an entry for a job of `run`, loaded or derived `at` and expiring at
    /// `expires`, may be taken `now`: unexpired, its run not stopped lately, and either young
    /// or checked by a fresh list (see the module docs).
    fn usable(&self, run: &str, at: Instant, expires: Instant, now: Instant) -> bool {
        let fresh = |since: Instant| now.saturating_duration_since(since) <= STOPPED_FRESH;
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        now < expires
            && !stopped.runs.contains(run)
            && (fresh(at) || stopped.listed_at.is_some_and(fresh))
    }

    /// Whether the runs stopped lately are to be listed: while unexpired entries are held
    /// (expired ones are dropped here too, when due).
    pub(super) fn watches_stopped(&self) -> bool {
        if self.prune_due(Instant::now()) {
            self.prune();
        }
        !self.lock().map.is_empty()
    }

    /// Records the runs cancelled or failed lately, as listed (whole) by a query that began
    /// at `listed_at`. (One thread lists, so a list never replaces a later one; the check
    /// only keeps that true.)
    pub(super) fn stopped_listed(&self, listed_at: Instant, runs: Vec<String>) {
        let runs: HashSet<String> = runs.into_iter().collect();
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if stopped.listed_at.is_some_and(|at| at > listed_at) {
            return;
        }
        let old = std::mem::replace(
            &mut *stopped,
            Stopped {
                listed_at: Some(listed_at),
                runs,
            },
        );
        drop(stopped);
        drop(old);
    }

    /// Whether expired entries are to be dropped now: every [`PRUNE_EVERY`].
    fn prune_due(&self, now: Instant) -> bool {
        let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
        let due = pruned.is_none_or(|at| now.duration_since(at) >= PRUNE_EVERY);
        if due {
            *pruned = Some(now);
        }
        due
    }

    /// The snapshot read ahead for this delivery, if it is a first delivery ([`take`]); a
    /// redelivery, or the reconciler's copy, drops the entry and loads on its own (see the
    /// module docs).
    ///
    /// [`take`]: Self::take
    pub(super) fn take_for(
        &self,
        job: &JobPayload,
        redelivered: bool,
    ) -> Option<(Vec<String>, RunSnapshot)> {
        let key = (job.run_id.clone(), job.node_id.clone(), job.iteration);
        if redelivered || job.recovered || job.wake {
            self.lock().remove(&key);
            return None;
        }
        self.take(&key)
    }

    /// Drops expired entries (the heartbeat calls this, so that they go when deliveries
    /// stop too).
    pub(super) fn prune(&self) {
        let now = Instant::now();
        let dropped = self.lock().drop_expired(now);
        self.count_unused(dropped as u64);
    }

    fn count_unused(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(counter) = &self.counted {
            counter.with_label_values(&["unused"]).inc_by(n);
        }
        let unused = self.unused.fetch_add(n, Ordering::Relaxed) + n;
        if unused > 4 * CAPACITY as u64 {
            self.unused.store(unused / 2, Ordering::Relaxed);
            let used = self.used.load(Ordering::Relaxed);
            self.used.store(used / 2, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::keys::{AWAITING_DETAILS, AWAITING_NODE_IDS, BLUEPRINT_ID};
    use std::sync::Arc;

    fn job(node: &str) -> JobKey {
        ("run".into(), node.into(), 0)
    }

    /// A derived entry for node `node`'s job that holds nothing.
    fn empty(node: &str) -> Derived {
        Derived {
            job: job(node),
            keys: Vec::new(),
            context: ContextMap::new(),
        }
    }

    fn snapshot(value: i64) -> RunSnapshot {
        let mut context = ContextMap::new();
        context.insert("x".into(), value.into());
        RunSnapshot {
            context,
            status: None,
        }
    }

    /// A chain `a → b`, a join `a, x → j`, a node `m` with an input map, a loop `a → l → l`,
    /// and `a → f`, where `f` is also `x`'s fallback.
    fn blueprint() -> Blueprint {
        Blueprint::from_json(
            r#"{"id":"d","metadata":{"version":"2"},"nodes":[
                {"id":"a","uses":"t"},{"id":"b","uses":"t"},
                {"id":"x","uses":"t","config":{"fallback":"f"}},
                {"id":"j","uses":"t"},{"id":"m","uses":"t","inputs":{"v":"x"}},
                {"id":"l","uses":"t"},{"id":"f","uses":"t"}],
              "edges":[{"source":"a","target":"b"},{"source":"a","target":"j"},
                {"source":"x","target":"j"},{"source":"a","target":"m"},
                {"source":"a","target":"l"},{"source":"l","target":"l"},
                {"source":"a","target":"f"}]}"#,
        )
        .expect("blueprint")
    }

    fn next(node: &str, rule: JoinRule, input: Value) -> NextJob {
        NextJob {
            report: crate::services::redis::SuccessorReport {
                job: node.into(),
                node: node.into(),
                iteration: 0,
                predecessor: "a".into(),
                rule,
            },
            input: Some(input),
        }
    }

    #[test]
    fn an_entry_is_taken_young_or_after_a_fresh_list_never_for_a_stopped_run() {
        let ahead = ReadAhead::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Young: taken with no list yet; older: not.
        assert!(ahead.usable("r", t0, t0 + DERIVED_LIFETIME, t0 + ms(100)));
        assert!(!ahead.usable("r", t0, t0 + DERIVED_LIFETIME, t0 + ms(1_000)));
        // A list that began less than half a second ago, without the run: taken.
        ahead.stopped_listed(t0 + ms(900), Vec::new());
        assert!(ahead.usable("r", t0, t0 + DERIVED_LIFETIME, t0 + ms(1_000)));
        assert!(!ahead.usable("r", t0, t0 + DERIVED_LIFETIME, t0 + ms(1_500)));
        // A run on the list: never, however young its entry; another run goes on.
        ahead.stopped_listed(t0 + ms(1_200), vec!["r".into()]);
        assert!(!ahead.usable("r", t0 + ms(1_100), t0 + DERIVED_LIFETIME, t0 + ms(1_200)));
        assert!(ahead.usable("q", t0, t0 + DERIVED_LIFETIME, t0 + ms(1_300)));
        // A list that began earlier does not replace a later one.
        ahead.stopped_listed(t0 + ms(1_000), Vec::new());
        assert!(!ahead.usable("r", t0 + ms(1_100), t0 + DERIVED_LIFETIME, t0 + ms(1_200)));
        // Past its lifetime, an entry is not taken, however fresh the list.
        ahead.stopped_listed(t0 + DERIVED_LIFETIME, Vec::new());
        assert!(ahead.usable(
            "q",
            t0,
            t0 + DERIVED_LIFETIME,
            t0 + DERIVED_LIFETIME - ms(1)
        ));
        assert!(!ahead.usable("q", t0, t0 + DERIVED_LIFETIME, t0 + DERIVED_LIFETIME));
    }

    #[test]
    fn the_stopped_runs_are_listed_only_while_entries_may_be_held() {
        let ahead = ReadAhead::default();
        assert!(!ahead.watches_stopped());
        // A failed load stores nothing.
        ahead.reserve(vec![job("a")]);
        ahead.fill(vec![(job("a"), Vec::new(), None)], Instant::now());
        assert!(!ahead.watches_stopped());
        ahead.put(vec![empty("b")], Instant::now());
        assert!(ahead.watches_stopped());
    }

    #[test]
    fn a_lone_successor_gets_what_its_load_would_return() {
        let bp = blueprint();
        let a = bp.node_index("a").expect("a");
        let mut read = ContextMap::new();
        read.insert(AWAITING_NODE_IDS.into(), serde_json::json!(["w"]));
        read.insert("_parent".into(), serde_json::json!({"runId": "p"}));
        let view = ContextView::new(Arc::new(read));
        // The first job's commit stamps the blueprint.
        let mut commit = NodeCommit::default();
        bp.stamp(&mut commit.set);
        commit.set.insert(input_key("b"), 7.into());
        let b = next("b", JoinRule::Immediate, 7.into());
        let d = derive(&bp, a, "r1", &view, &commit, &b).expect("derived");
        assert_eq!(d.job, ("r1".to_string(), "b".to_string(), 0));
        assert_eq!(d.keys, expected_reads(Some(&bp), "b"));
        let expected = serde_json::json!({
            "blueprintId": "d", "blueprintVersion": "2", "_parent": {"runId": "p"},
            "_awaitingNodeIds": ["w"], "_inputs.b": 7});
        assert_eq!(Value::Object(d.context.clone()), expected);
        assert!(!d.context.contains_key(&output_key("b")));
        // Stored, it is taken once, by a first delivery, as a running run's.
        let p = ReadAhead::default();
        p.put(vec![d], Instant::now());
        let first = JobPayload::new("r1", "d", "b", 0);
        let (keys, snapshot) = p.take_for(&first, false).expect("the entry");
        assert_eq!(keys, expected_reads(Some(&bp), "b"));
        assert_eq!(snapshot.status, Some(RunStatus::Running));
        assert_eq!(Value::Object(snapshot.context), expected);
        assert!(p.take_for(&first, false).is_none());
    }

    #[test]
    fn only_a_successor_its_predecessor_alone_decides_is_derived() {
        let bp = blueprint();
        let a = bp.node_index("a").expect("a");
        let view = ContextView::new(Arc::new(ContextMap::new()));
        let commit = NodeCommit::default();
        let derived = |n: &NextJob| derive(&bp, a, "r", &view, &commit, n).is_some();
        assert!(derived(&next("b", JoinRule::Immediate, 1.into())));
        // Another predecessor writes a join's input too.
        assert!(!derived(&next("j", JoinRule::All(2), 1.into())));
        assert!(!derived(&next("j", JoinRule::Immediate, 1.into())));
        // An input map reads another node's output.
        assert!(!derived(&next("m", JoinRule::Immediate, 1.into())));
        // A node that repeats reads its bookkeeping.
        assert!(!derived(&next("l", JoinRule::Immediate, 1.into())));
        // A fallback may have run already, standing in for the node it is the fallback of.
        assert!(!derived(&next("f", JoinRule::Immediate, 1.into())));
        // No input written, or one too big to hold.
        let mut none = next("b", JoinRule::Immediate, 1.into());
        none.input = None;
        assert!(!derived(&none));
        let big = "x".repeat(MAX_DERIVED_BYTES);
        assert!(!derived(&next("b", JoinRule::Immediate, big.into())));
        let half = Value::from("y".repeat(MAX_DERIVED_BYTES / 2));
        let nested = serde_json::json!({"k": [half.clone(), half.clone(), half]});
        assert!(!derived(&next("b", JoinRule::Immediate, nested)));
        let empties = Value::from(vec![Value::from(""); MAX_DERIVED_BYTES / 32]);
        assert!(!derived(&next("b", JoinRule::Immediate, empties)));
    }

    #[test]
    fn a_commit_that_writes_its_successors_keys_leaves_them_to_a_load() {
        let bp = blueprint();
        let a = bp.node_index("a").expect("a");
        let b = next("b", JoinRule::Immediate, 1.into());
        let derived = |read: ContextMap, commit: &NodeCommit| {
            let view = ContextView::new(Arc::new(read));
            derive(&bp, a, "r", &view, commit, &b).is_some()
        };
        let mut commit = NodeCommit::default();
        commit.set.insert(input_key("b"), 1.into());
        commit.set.insert(BLUEPRINT_ID.into(), "d".into());
        assert!(
            derived(ContextMap::new(), &commit),
            "the input and header keys"
        );
        // The store drops a node's own write of the awaiting keys; a write of the successor's
        // output, or a deletion beside its input, is the store's to decide.
        for key in [AWAITING_NODE_IDS.to_string(), output_key("b")] {
            let mut writes = commit.clone();
            writes.set.insert(key.clone(), 1.into());
            assert!(!derived(ContextMap::new(), &writes), "{key}");
        }
        let mut deletes = commit.clone();
        deletes.delete.push(input_key("b"));
        assert!(!derived(ContextMap::new(), &deletes));
        // Large awaiting details count against the size too.
        let mut read = ContextMap::new();
        read.insert(
            AWAITING_DETAILS.into(),
            serde_json::json!({"w": "z".repeat(MAX_DERIVED_BYTES)}),
        );
        assert!(!derived(read, &commit));
    }

    #[test]
    fn an_entry_is_taken_once() {
        let p = ReadAhead::default();
        assert_eq!(p.reserve(vec![job("a")]), vec![job("a")]);
        assert!(p.reserve(vec![job("a")]).is_empty(), "reserved twice");
        p.fill(
            vec![(job("a"), vec!["x".into()], Some(snapshot(1)))],
            Instant::now(),
        );
        let (keys, taken) = p.take(&job("a")).expect("the snapshot");
        assert_eq!(keys, vec!["x".to_string()]);
        assert_eq!(taken.context.get("x"), Some(&1.into()));
        assert!(p.take(&job("a")).is_none(), "taken twice");
        assert!(p.take(&job("b")).is_none(), "never reserved");
    }

    #[test]
    fn a_delivery_gets_a_load_filled_while_it_may_wait() {
        let p = ReadAhead::default();
        p.reserve(vec![job("a")]);
        std::thread::scope(|s| {
            let taker = s.spawn(|| p.take(&job("a")));
            // The taker finds the entry `Loading` and waits until it is filled — or, if this
            // thread is quicker, finds it filled; either way it gets the snapshot.
            p.fill(vec![(job("a"), vec![], Some(snapshot(2)))], Instant::now());
            let (_, taken) = taker.join().expect("taker").expect("the snapshot");
            assert_eq!(taken.context.get("x"), Some(&2.into()));
        });
    }

    #[test]
    fn a_delivery_stops_waiting_for_a_load_that_does_not_come() {
        let p = ReadAhead::default();
        p.reserve(vec![job("a")]);
        let started = Instant::now();
        assert!(p.take(&job("a")).is_none());
        assert!(started.elapsed() >= WAIT);
        // The entry is gone: a late fill stores nothing.
        p.fill(vec![(job("a"), vec![], Some(snapshot(3)))], Instant::now());
        assert!(p.take(&job("a")).is_none());
    }

    #[test]
    fn only_a_first_delivery_takes_an_entry() {
        let p = ReadAhead::default();
        let first = JobPayload::new("run", "bp", "a", 0);
        let mut redelivered = first.clone();
        let mut recovered = first.clone();
        recovered.recovered = true;
        let mut wake = first.clone();
        wake.wake = true;
        for (copy, flagged) in [
            (&mut redelivered, true),
            (&mut recovered, false),
            (&mut wake, false),
        ] {
            p.reserve(vec![job("a")]);
            p.fill(vec![(job("a"), vec![], Some(snapshot(1)))], Instant::now());
            assert!(p.take_for(copy, flagged).is_none(), "{copy:?}");
            // The entry is gone: not even a first delivery finds it now.
            assert!(p.take_for(&first, false).is_none(), "{copy:?}");
        }
        p.reserve(vec![job("a")]);
        p.fill(vec![(job("a"), vec![], Some(snapshot(2)))], Instant::now());
        assert!(p.take_for(&first, false).is_some());
    }

    #[test]
    fn a_failed_load_leaves_the_delivery_to_load_on_its_own() {
        let p = ReadAhead::default();
        p.reserve(vec![job("a")]);
        p.fill(vec![(job("a"), vec![], None)], Instant::now());
        assert!(p.take(&job("a")).is_none());
    }

    #[test]
    fn derived_entries_leave_room_for_loads() {
        let p = ReadAhead::default();
        let derived = (0..2 * CAPACITY).map(|i| empty(&format!("d{i}"))).collect();
        p.put(derived, Instant::now());
        assert_eq!(p.reserve(vec![job("a")]), vec![job("a")]);
        // Loads have their own bound, derived entries theirs.
        let loads: Vec<JobKey> = (0..2 * CAPACITY).map(|i| job(&format!("l{i}"))).collect();
        assert_eq!(p.reserve(loads).len(), CAPACITY - 1);
        let more = (0..DERIVED_CAPACITY)
            .map(|i| empty(&format!("e{i}")))
            .collect();
        p.put(more, Instant::now());
        assert_eq!(p.lock().map.len(), CAPACITY + DERIVED_CAPACITY);
        // A derived entry taken makes room for one more, and not for a load.
        assert!(p.take(&job("d0")).is_some());
        assert!(p.reserve(vec![job("b")]).is_empty());
        p.put(vec![empty("e-last")], Instant::now());
        assert!(p.take(&job("e-last")).is_some());
    }

    #[test]
    fn unused_entries_make_reading_ahead_occasional() {
        let p = ReadAhead::default();
        assert!(p.worthwhile());
        p.count_unused(10);
        let tries = (0..PROBE_EVERY * 2).filter(|_| p.worthwhile()).count();
        assert_eq!(tries, 2, "one batch in {PROBE_EVERY} probes");
        p.used.fetch_add(10, Ordering::Relaxed);
        assert!(p.worthwhile() && p.worthwhile());
    }
}
