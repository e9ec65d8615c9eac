//! Concurrent snapshot reads, node commits and `finish_job` calls are grouped into shared
//! statements and pipelines: every caller must still get exactly its own answer, guards must
//! hold across the callers of one batch, and a bad row must fail only its own request.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};

use common::*;
use flowcraft_rabbitmq::coordination::{JoinRule, SuccessorReport};
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::store::{CommitGuard, Execution, NodeCommit, StoreError};
use flowcraft_rabbitmq::RedisCoordinationStore;
use serde_json::{json, Value};

const THREADS: usize = 8;

/// Runs `work(thread)` on THREADS threads released together; returns their results.
fn together<T: Send + 'static>(work: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(THREADS));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (barrier, work) = (barrier.clone(), work.clone());
            std::thread::spawn(move || {
                barrier.wait();
                work(t)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("a test thread panicked"))
        .collect()
}

#[test]
fn concurrent_commits_apply_once_per_node_and_lose_no_update() {
    let env = TestEnv::new("grouped_commit");
    let store = env.store();
    let runs: Vec<String> = (0..40).map(|i| format!("run-{i}")).collect();
    for run in &runs {
        store.create_run(run, &ContextMap::new()).unwrap();
    }
    let (shared_store, shared_runs) = (store.clone(), Arc::new(runs.clone()));
    let applied = together(move |t| {
        let mut mine = Vec::new();
        for run in shared_runs.iter() {
            // Every thread commits the same node `same` (one may win), and its own node.
            let (commit, guard) = commit_of("same", json!(t));
            let won = shared_store.commit_node(run, commit, guard).unwrap();
            let (commit, guard) = commit_of(&format!("own{t}"), json!(t));
            let own = shared_store.commit_node(run, commit, guard).unwrap();
            mine.push((run.clone(), won, own));
        }
        mine
    });
    let mut winners: HashMap<String, usize> = HashMap::new();
    for (run, won, own) in applied.into_iter().flatten() {
        assert!(own, "run {run}: a thread's own node did not apply");
        *winners.entry(run).or_default() += usize::from(won);
    }
    for run in &runs {
        assert_eq!(
            winners.get(run),
            Some(&1),
            "run {run}: `same` applied not once"
        );
        let context = env.context(run);
        for t in 0..THREADS {
            assert_eq!(context.get(&format!("_outputs.own{t}")), Some(&json!(t)));
        }
        let same = context.get("_outputs.same").and_then(Value::as_u64);
        assert!(same.is_some_and(|t| (t as usize) < THREADS));
        assert_eq!(
            env.store().status(run).unwrap().map(|s| s.status.as_str()),
            Some("running")
        );
    }
}

/// Concurrent node commits and run completions: each caller gets its own answer, a completed
/// run is completed once, and a run that awaits a node is not.
#[test]
fn concurrent_commits_and_completions_each_get_their_own_answer() {
    const PER_THREAD: usize = 10;
    let env = TestEnv::new("grouped_write");
    let store = env.store();
    for t in 0..THREADS {
        for i in 0..PER_THREAD {
            store
                .create_run(&format!("commit-{t}-{i}"), &ContextMap::new())
                .unwrap();
            let context = ctx(json!({ "value": [t, i] }));
            store
                .create_run(&format!("done-{t}-{i}"), &context)
                .unwrap();
        }
    }
    store
        .create_run("awaiting", &ctx(json!({ "_awaitingNodeIds": ["w"] })))
        .unwrap();
    let shared_store = store.clone();
    let answers = together(move |t| {
        let mut mine = Vec::new();
        for i in 0..PER_THREAD {
            let (commit, guard) = commit_of("n", json!([t, i]));
            let applied = shared_store
                .commit_node(&format!("commit-{t}-{i}"), commit, guard)
                .unwrap();
            let done = format!("done-{t}-{i}");
            let completed = shared_store.complete_run(&done).unwrap();
            let again = shared_store.complete_run(&done).unwrap();
            let awaiting = shared_store.complete_run("awaiting").unwrap();
            mine.push((t, i, applied, completed, again, awaiting));
        }
        mine
    });
    let answers: Vec<_> = answers.into_iter().flatten().collect();
    assert_eq!(answers.len(), THREADS * PER_THREAD);
    for (t, i, applied, completed, again, awaiting) in answers {
        assert!(applied, "commit-{t}-{i}: the commit did not apply");
        let context = env.context(&format!("commit-{t}-{i}"));
        assert_eq!(context.get("_outputs.n"), Some(&json!([t, i])));
        let completed = completed.unwrap_or_else(|| panic!("done-{t}-{i} was not completed"));
        assert_eq!(completed.get("value"), Some(&json!([t, i])));
        assert_eq!(again, None, "done-{t}-{i} was completed twice");
        assert_eq!(awaiting, None, "a run awaiting a node was completed");
        let status = store.status(&format!("done-{t}-{i}")).unwrap().unwrap();
        assert_eq!(status.status, "completed");
        let result = status.result.unwrap_or_default();
        assert_eq!(result["context"]["value"], json!([t, i]));
        let commit_status = store.status(&format!("commit-{t}-{i}")).unwrap().unwrap();
        assert_eq!(commit_status.status, "running");
    }
    assert_eq!(store.status("awaiting").unwrap().unwrap().status, "running");
}

#[test]
fn concurrent_loads_each_get_their_own_run_and_a_bad_row_fails_alone() {
    let env = TestEnv::new("grouped_load");
    let store = env.store();
    for i in 0..20 {
        let mut context = ContextMap::new();
        context.insert("n".into(), json!(i));
        store.create_run(&format!("run-{i}"), &context).unwrap();
    }
    // A context row that is not an object.
    let mut conn = env.pg.get().unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {} (run_id, context_data) VALUES ('bad', '[1]')",
            env.tables.contexts
        ),
        &[],
    )
    .unwrap();
    drop(conn);
    let shared = store.clone();
    let outcomes = together(move |t| {
        let mut seen = Vec::new();
        for round in 0..50 {
            let i = (t * 7 + round) % 23; // 0..19 exist, 20 and 21 do not, 22 is bad
            let run = if i == 22 {
                "bad".to_string()
            } else {
                format!("run-{i}")
            };
            seen.push((i, shared.load(&run)));
        }
        seen
    });
    let mut bad = 0;
    for (i, loaded) in outcomes.into_iter().flatten() {
        match (i, loaded) {
            (0..=19, Ok(Some(snapshot))) => {
                assert_eq!(snapshot.context.get("n"), Some(&json!(i)));
                assert_eq!(snapshot.status.map(|s| s.as_str()), Some("running"));
            }
            (20 | 21, Ok(None)) => {}
            (22, Err(StoreError::Malformed { run_id, .. })) => {
                assert_eq!(run_id, "bad");
                bad += 1;
            }
            (i, other) => panic!("load {i}: unexpected {other:?}"),
        }
    }
    assert!(bad > 0, "the malformed row was never loaded");
}

#[test]
fn concurrent_keyed_loads_each_get_exactly_the_keys_they_asked_for() {
    const RUNS: usize = 6;
    let env = TestEnv::new("grouped_load_keys");
    let store = env.store();
    for r in 0..RUNS {
        let run = format!("run-{r}");
        let start = json!({ "blueprintId": format!("bp-{r}"), "start": r, "hidden": r });
        store.create_run(&run, &ctx(start)).unwrap();
        let mut writes: Vec<(String, Option<Value>)> = (0..THREADS)
            .map(|t| (format!("_outputs.n{t}"), Some(json!([r, t]))))
            .collect();
        writes.push(("hidden".into(), None));
        store.write_keys(&run, writes).unwrap();
    }
    let shared = store.clone();
    // Every thread asks every run (so several requests of one run share a statement) for
    // its own output key, a header key, a key of the starting context, a deleted one and
    // one that was never written.
    let answers = together(move |t| {
        let mut seen = Vec::new();
        for round in 0..20 {
            let r = (t + round) % RUNS;
            let keys = vec![
                format!("_outputs.n{t}"),
                "blueprintId".to_string(),
                "start".to_string(),
                "hidden".to_string(),
                format!("_inputs.n{t}"),
            ];
            let loaded = shared.load_keys(&format!("run-{r}"), keys).unwrap();
            seen.push((t, r, loaded));
        }
        seen
    });
    for (t, r, loaded) in answers.into_iter().flatten() {
        let snapshot = loaded.unwrap_or_else(|| panic!("run-{r} was not found"));
        let expected = ctx(json!({
            format!("_outputs.n{t}"): [r, t],
            "blueprintId": format!("bp-{r}"),
            "start": r,
        }));
        assert_eq!(snapshot.context, expected, "thread {t}, run-{r}");
        assert_eq!(snapshot.status.map(|s| s.as_str()), Some("running"));
    }
}

#[test]
fn concurrent_finish_jobs_fire_an_all_join_once_even_after_a_script_flush() {
    let env = TestEnv::new("grouped_finish");
    let store = RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone());
    // Pipelined scripts are not loaded by the pipeline itself: start without the script.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut *env.redis.get().unwrap())
        .unwrap();
    let starts: Vec<String> = (0..THREADS).map(|t| format!("p{t}")).collect();
    let shared = (store.clone(), starts.clone());
    let outcomes = together(move |t| {
        let (store, starts) = &shared;
        let report = SuccessorReport {
            job: "join".into(),
            node: "join".into(),
            iteration: 0,
            predecessor: format!("p{t}"),
            rule: JoinRule::All(THREADS),
        };
        // Other runs in the same batches must not disturb this one.
        let other = store
            .finish_job(&format!("other-{t}"), "x", &[], &[])
            .unwrap();
        assert!(other.run_idle);
        store
            .finish_job("run", &format!("p{t}"), starts, &[report])
            .unwrap()
    });
    let fired = outcomes.iter().filter(|o| o.ready == vec![true]).count();
    assert_eq!(fired, 1, "the join fired {fired} times");
    assert!(outcomes.iter().all(|o| !o.run_idle), "join is outstanding");
    let (outstanding, registered) = store.outstanding_jobs("run").unwrap();
    assert!(registered);
    assert_eq!(outstanding, vec!["join".to_string()]);
    assert!(store.finish_job("run", "join", &[], &[]).unwrap().run_idle);
}

/// A batch the caller gathered (the worker's job tails) commits nodes of one run together,
/// except those that write a row in common: copies of one job, two inputs of one `any`
/// join, two pauses. Each gets the answer it would get alone.
#[test]
fn a_gathered_batch_commits_one_runs_nodes_together_unless_they_write_one_row() {
    let env = TestEnv::new("gathered_batch");
    let store = env.store();
    store.create_run("r", &ContextMap::new()).unwrap();
    let mut commits = Vec::new();
    for node in ["a", "b", "a"] {
        let (commit, guard) = commit_of(node, json!(node));
        commits.push(("r".to_string(), commit, guard));
    }
    // Two predecessors of the `any` join `j`: the first input written stays.
    for (node, input) in [("p1", 1), ("p2", 2)] {
        let (mut commit, guard) = commit_of(node, json!(node));
        commit.set_input("_inputs.j".into(), json!(input), true);
        commits.push(("r".to_string(), commit, guard));
    }
    // Two pauses of the run.
    for node in ["w1", "w2"] {
        let (_, guard) = commit_of(node, Value::Null);
        let commit = NodeCommit {
            awaiting: Some((node.to_string(), json!({"type": "webhook"}))),
            ..NodeCommit::default()
        };
        commits.push(("r".to_string(), commit, guard));
    }
    let applied: Vec<bool> = flowcraft_rabbitmq::testing::commit_nodes(&store, commits)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(applied, [true, true, false, true, true, true, true]);
    let context = env.context("r");
    assert_eq!(context.get("_outputs.a"), Some(&json!("a")));
    assert_eq!(context.get("_outputs.b"), Some(&json!("b")));
    assert_eq!(context.get("_inputs.j"), Some(&json!(1)));
    assert_eq!(context.get("_awaitingNodeIds"), Some(&json!(["w1", "w2"])));
    assert_eq!(
        context.get("_awaitingDetails"),
        Some(&json!({"w1": {"type": "webhook"}, "w2": {"type": "webhook"}}))
    );
    assert_eq!(
        store.status("r").unwrap().map(|s| s.status.as_str()),
        Some("awaiting")
    );
}

/// Commits of one run that set or delete the same key (the predecessors of an `all` join
/// each write its input) share a statement: the last commit's write wins, as if they ran
/// one by one, and a commit that does not apply (a copy of a committed job) writes nothing.
/// Both statements: the plain one, and the full one (a keep-first input in the batch).
#[test]
fn a_gathered_batch_applies_writes_of_one_key_in_order() {
    let env = TestEnv::new("gathered_same_key");
    let store = env.store();
    for (run, keep_first) in [("plain", false), ("full", true)] {
        store.create_run(run, &ContextMap::new()).unwrap();
        let mut commits = Vec::new();
        let mut add = |node: &str, set: &[(&str, Value)], delete: &[&str]| {
            let (mut commit, guard) = commit_of(node, json!(node));
            for (key, value) in set {
                commit.set.insert(key.to_string(), value.clone());
            }
            commit.delete.extend(delete.iter().map(|k| k.to_string()));
            commits.push((run.to_string(), commit, guard));
        };
        add("p1", &[("_inputs.j", json!(1)), ("k", json!(1))], &[]);
        add("p2", &[("_inputs.j", json!(2)), ("k", json!(2))], &["m"]);
        add("p1", &[("_inputs.j", json!(3))], &[]);
        add("p3", &[("m", json!(5))], &["k"]);
        if keep_first {
            let (mut commit, guard) = commit_of("q", json!("q"));
            commit.set_input("_inputs.any".into(), json!(7), true);
            commits.push((run.to_string(), commit, guard));
        }
        let applied: Vec<bool> = flowcraft_rabbitmq::testing::commit_nodes(&store, commits)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(applied[..4], [true, true, false, true], "{run}");
        let context = env.context(run);
        assert_eq!(
            context.get("_inputs.j"),
            Some(&json!(2)),
            "{run}: {context:?}"
        );
        assert_eq!(context.get("k"), None, "{run}: {context:?}");
        assert_eq!(context.get("m"), Some(&json!(5)), "{run}: {context:?}");
        assert_eq!(context.get("_outputs.p1"), Some(&json!("p1")), "{run}");
        if keep_first {
            assert_eq!(applied[4..], [true], "{run}");
            assert_eq!(context.get("_inputs.any"), Some(&json!(7)), "{run}");
        }
    }
}

/// Header keys live in the run's context row: two commits of a batch that each write one
/// must both land (one statement would update the row for one of them only).
#[test]
fn a_gathered_batch_keeps_every_header_write_of_a_run() {
    let env = TestEnv::new("gathered_header");
    let store = env.store();
    store.create_run("r", &ContextMap::new()).unwrap();
    let mut commits = Vec::new();
    for (node, key, value) in [
        ("a", "blueprintVersion", json!("7")),
        ("b", "_parent", json!({"runId": "p"})),
    ] {
        let (mut commit, guard) = commit_of(node, json!(node));
        commit.set.insert(key.into(), value);
        commits.push(("r".to_string(), commit, guard));
    }
    let applied: Vec<bool> = flowcraft_rabbitmq::testing::commit_nodes(&store, commits)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(applied, [true, true]);
    let context = env.context("r");
    assert_eq!(context.get("blueprintVersion"), Some(&json!("7")));
    assert_eq!(context.get("_parent"), Some(&json!({"runId": "p"})));
    // Read key by key, as a job reads them (from the `header` column).
    let some = store
        .load_keys("r", vec!["blueprintVersion".into(), "_parent".into()])
        .unwrap()
        .unwrap();
    assert_eq!(some.context.len(), 2);
}

/// A resume that writes a header key puts it where jobs read it (the context row's
/// `header` column), as a commit does: read key by key and read whole, the run agrees.
#[test]
fn a_resume_writes_header_keys_where_jobs_read_them() {
    let env = TestEnv::new("resume_header");
    let store = env.store();
    store
        .create_run("r", &ctx(json!({"blueprintVersion": "1", "x": 1})))
        .unwrap();
    let (mut pause, guard) = commit_of("w", json!(null));
    pause.set.clear();
    pause.awaiting = Some(("w".into(), json!({"type": "webhook"})));
    assert!(store.commit_node("r", pause, guard).unwrap());

    let mut resumed = NodeCommit::default();
    resumed.set.insert("_outputs.w".into(), json!("event"));
    resumed.set.insert("blueprintVersion".into(), json!("2"));
    resumed.delete.push("x".into());
    assert!(store.resume_nodes("r", &["w".into()], resumed).unwrap());

    let keys = ["blueprintVersion", "x", "_outputs.w"].map(String::from);
    let some = store.load_keys("r", keys.to_vec()).unwrap().unwrap();
    assert_eq!(
        Value::Object(some.context),
        json!({"blueprintVersion": "2", "_outputs.w": "event"})
    );
    let whole = env.context("r");
    assert_eq!(whole.get("blueprintVersion"), Some(&json!("2")));
    assert!(!whole.contains_key("x"));
}

/// Makes every status row of the test's runs last touched an hour ago.
fn age_statuses(env: &TestEnv) {
    let statuses = &env.tables.statuses;
    env.pg
        .get()
        .unwrap()
        .execute(
            &format!("UPDATE {statuses} SET updated_at = NOW() - interval '1 hour'"),
            &[],
        )
        .unwrap();
}

/// Node `n`'s commit: output `{"v": 1}` and its bare-id copy, `input` for its successor `m`,
/// key `gone` deleted, and a history row of attempt `attempt`.
fn executed_commit(input: Value, attempt: u32) -> (NodeCommit, CommitGuard) {
    let (mut commit, guard) = commit_of("n", json!({"v": 1}));
    commit.set.insert("n".into(), json!({"v": 1}));
    commit.set.insert("_inputs.m".into(), input);
    commit.delete.push("gone".into());
    commit.execution = Some(Execution {
        node_id: "n".into(),
        attempt,
        started_ms: 1_000.0,
        finished_ms: 1_500.0,
        worker: "host:1".into(),
    });
    (commit, guard)
}

/// A lone plain commit (its statement's parameters plain, not arrays) writes what a batched
/// one writes (the output, the sets and deletions, the history row), applies once, and
/// applies again once its output was deleted, as the batched one does.
#[test]
fn a_lone_commit_writes_what_a_batched_one_writes() {
    let env = TestEnv::new("lone_commit");
    let store = env.store();
    for run in ["lone", "b1", "b2"] {
        store
            .create_run(run, &ctx(json!({"gone": 1, "kept": 2})))
            .unwrap();
    }
    let commit = || executed_commit(json!({"v": 1}), 2);
    let history = |run: &str| -> Vec<(String, u32, u32, String, String)> {
        store
            .history(run)
            .unwrap()
            .into_iter()
            .map(|h| (h.node_id, h.iteration, h.attempt, h.outcome, h.worker))
            .collect()
    };
    // Each status row last touched long ago; whether a commit touched it since.
    let statuses = env.tables.statuses.clone();
    let age_all = || age_statuses(&env);
    let touched = |run: &str| -> bool {
        env.pg
            .get()
            .unwrap()
            .query_one(
                &format!(
                    "SELECT updated_at > NOW() - interval '1 minute' FROM {statuses} WHERE run_id = $1"
                ),
                &[&run],
            )
            .unwrap()
            .get(0)
    };
    age_all();
    // Alone (a lone caller's commit), then batched with another run's.
    let (c, g) = commit();
    assert!(store.commit_node("lone", c, g).unwrap());
    assert!(touched("lone"));
    assert!(!touched("b1"));
    let of = |run: &str| {
        let (c, g) = commit();
        (run.to_string(), c, g)
    };
    let batched = flowcraft_rabbitmq::testing::commit_nodes(&store, vec![of("b1"), of("b2")]);
    assert!(batched.into_iter().all(|applied| applied.unwrap()));
    assert!(touched("b1") && touched("b2"));
    let lone = env.context("lone");
    assert_eq!(
        Value::Object(lone.clone()),
        json!({"kept": 2, "n": {"v": 1}, "_outputs.n": {"v": 1}, "_inputs.m": {"v": 1}})
    );
    assert_eq!(lone, env.context("b1"));
    let recorded = vec![(
        "n".to_string(),
        0,
        2,
        "completed".to_string(),
        "host:1".to_string(),
    )];
    assert_eq!(history("lone"), recorded);
    assert_eq!(history("b1"), recorded);

    // Once: the same execution again applies nothing, records nothing, touches nothing.
    age_all();
    let (c, g) = commit();
    assert!(!store.commit_node("lone", c, g).unwrap());
    assert_eq!(history("lone").len(), 1);
    assert!(!touched("lone"));
    // Its output deleted, the node commits again.
    store
        .write_keys("lone", vec![("_outputs.n".into(), None)])
        .unwrap();
    let (c, g) = commit();
    assert!(store.commit_node("lone", c, g).unwrap());
    assert_eq!(
        env.context("lone").get("_outputs.n"),
        Some(&json!({"v": 1}))
    );
    assert_eq!(history("lone").len(), 2);
}

/// A plain commit inserts its guard's row and the keys no other commit writes (`new_keys`),
/// alone or batched, and writes the rest as any commit: the same rows as the usual way. A
/// copy of a committed execution is refused, and a commit that finds a row to insert there
/// (a new key written before, its output deleted) applies the usual way.
#[test]
fn a_commit_inserting_its_new_keys_writes_them_once_and_falls_back_when_one_is_there() {
    let env = TestEnv::new("new_keys");
    let store = env.store();
    let runs = [
        "alone", "usual", "b1", "b2", "b3", "there", "join", "chain1", "chain2", "chain3",
        "deleting",
    ];
    for run in runs {
        store
            .create_run(run, &ctx(json!({"kept": 2, "gone": 3})))
            .unwrap();
    }
    let commit = |new_keys: bool, input: i64| {
        let (mut commit, guard) = executed_commit(json!(input), 1);
        // A key another commit may write too.
        commit.set.insert("total".into(), json!(input));
        if new_keys {
            commit.new_keys = vec!["n".into(), "_inputs.m".into()];
        }
        (commit, guard)
    };
    let history = |run: &str| store.history(run).unwrap().len();
    let expected = |input: i64| json!({"kept": 2, "n": {"v": 1}, "_outputs.n": {"v": 1}, "_inputs.m": input, "total": input});
    // Alone, and the usual way: the same rows, the same history.
    let (c, g) = commit(true, 1);
    assert!(store.commit_node("alone", c, g).unwrap());
    let (c, g) = commit(false, 1);
    assert!(store.commit_node("usual", c, g).unwrap());
    assert_eq!(Value::Object(env.context("alone")), expected(1));
    assert_eq!(env.context("alone"), env.context("usual"));
    assert_eq!((history("alone"), history("usual")), (1, 1));
    // Its copy is refused and records nothing.
    let (c, g) = commit(true, 2);
    assert!(!store.commit_node("alone", c, g).unwrap());
    assert_eq!(Value::Object(env.context("alone")), expected(1));
    assert_eq!(history("alone"), 1);

    // Batched: two new commits, then two more with a copy of a committed one among them.
    let of = |run: &str, input: i64| {
        let (c, g) = commit(true, input);
        (run.to_string(), c, g)
    };
    let applied = |results: Vec<Result<bool, StoreError>>| -> Vec<bool> {
        results.into_iter().map(|r| r.unwrap()).collect()
    };
    let first = flowcraft_rabbitmq::testing::commit_nodes(&store, vec![of("b1", 1), of("b2", 1)]);
    assert_eq!(applied(first), vec![true, true]);
    let second = flowcraft_rabbitmq::testing::commit_nodes(&store, vec![of("b1", 3), of("b3", 1)]);
    assert_eq!(applied(second), vec![false, true]);
    for run in ["b1", "b2", "b3"] {
        assert_eq!(Value::Object(env.context(run)), expected(1), "{run}");
        assert_eq!(history(run), 1, "{run}");
    }

    // A key written before (the input, by someone else), then the output deleted: each time
    // the commit applies, its writes winning.
    store
        .write_keys("there", vec![("_inputs.m".into(), Some(json!(0)))])
        .unwrap();
    let (c, g) = commit(true, 4);
    assert!(store.commit_node("there", c, g).unwrap());
    assert_eq!(Value::Object(env.context("there")), expected(4));
    store
        .write_keys("there", vec![("_outputs.n".into(), None)])
        .unwrap();
    let (c, g) = commit(true, 5);
    assert!(store.commit_node("there", c, g).unwrap());
    assert_eq!(Value::Object(env.context("there")), expected(5));
    assert_eq!(history("there"), 2);

    // Two commits of one run in one statement, setting one key: the last one's write kept.
    let joined = |node: &str, input: i64| {
        let (mut c, g) = commit_of(node, json!(input));
        c.set.insert("_inputs.j".into(), json!(input));
        ("join".to_string(), c, g)
    };
    let both =
        flowcraft_rabbitmq::testing::commit_nodes(&store, vec![joined("p", 1), joined("q", 2)]);
    assert_eq!(applied(both), vec![true, true]);
    let context = env.context("join");
    assert_eq!(context.get("_inputs.j"), Some(&json!(2)));
    assert_eq!(context.get("_outputs.p"), Some(&json!(1)));

    // Commits of new keys only (a chain's), alone and batched.
    let chained = |run: &str| {
        let (mut c, g) = commit_of("n", json!(7));
        c.set.insert("n".into(), json!(7));
        c.set.insert("_inputs.m".into(), json!(7));
        c.new_keys = vec!["n".into(), "_inputs.m".into()];
        (run.to_string(), c, g)
    };
    let (_, c, g) = chained("chain1");
    assert!(store.commit_node("chain1", c, g).unwrap());
    let batched = flowcraft_rabbitmq::testing::commit_nodes(
        &store,
        vec![chained("chain2"), chained("chain3")],
    );
    assert_eq!(applied(batched), vec![true, true]);
    for run in ["chain1", "chain2", "chain3"] {
        assert_eq!(
            Value::Object(env.context(run)),
            json!({"kept": 2, "gone": 3, "n": 7, "_outputs.n": 7, "_inputs.m": 7}),
            "{run}"
        );
    }
    let (_, c, g) = chained("chain1");
    assert!(!store.commit_node("chain1", c, g).unwrap());
    // New keys and a deletion, no other key.
    let (_, mut c, g) = chained("deleting");
    c.delete.push("gone".into());
    assert!(store.commit_node("deleting", c, g).unwrap());
    assert_eq!(
        Value::Object(env.context("deleting")),
        json!({"kept": 2, "n": 7, "_outputs.n": 7, "_inputs.m": 7})
    );
}

/// A copy of a job committing the usual way holds its guard row while the other copy's
/// insert statement comes: that one waits on the guard row — it locks no other row first —
/// so the first copy goes on writing its other rows (here: the successor's input and the
/// status row's touch), and the second, once the first commits, is refused. Locking the
/// input, or the status row, first deadlocked.
#[test]
fn a_copy_inserting_its_guard_waits_on_the_guard_row_of_a_copy_committing_the_usual_way() {
    let env = TestEnv::new("insert_order");
    let store = env.store();
    store.create_run("r", &ctx(json!({}))).unwrap();
    let entries = env.tables.entries();
    // The status row untouched for long: each copy touches it.
    let statuses = env.tables.statuses.clone();
    let touch = format!("UPDATE {statuses} SET updated_at = NOW() WHERE run_id = 'r'");
    age_statuses(&env);
    // The first copy, by hand: its guard row written, its transaction open.
    let mut first = env.pg.get().unwrap();
    let mut tx = first.transaction().unwrap();
    let insert = format!("INSERT INTO {entries} (run_id, key, value) VALUES ('r', $1, $2)");
    tx.execute(&insert, &[&"_outputs.n", &json!({"v": 1})])
        .unwrap();
    let second = std::thread::scope(|scope| {
        let copy = scope.spawn(|| {
            let (mut c, g) = commit_of("n", json!({"v": 1}));
            c.set.insert("n".into(), json!({"v": 1}));
            c.set.insert("_inputs.m".into(), json!({"v": 1}));
            c.new_keys = vec!["n".into(), "_inputs.m".into()];
            store.commit_node("r", c, g)
        });
        // The second copy's statement waits on a row lock (the guard row's, it should be).
        env.eventually("the second copy waits on a lock", WAIT, || {
            let waiting: i64 = env
                .pg
                .get()
                .unwrap()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
                    &[&entries],
                )
                .unwrap()
                .get(0);
            waiting == 1
        });
        // The first copy writes the successor's input and commits: no deadlock.
        tx.execute(&insert, &[&"_inputs.m", &json!({"v": 1})])
            .expect("the first copy's write (a deadlock?)");
        tx.execute(&touch, &[])
            .expect("the first copy's touch (a deadlock?)");
        tx.commit().unwrap();
        copy.join().unwrap()
    });
    assert!(!second.expect("the second copy's commit"), "applied twice");
    assert_eq!(
        Value::Object(env.context("r")),
        json!({"_outputs.n": {"v": 1}, "_inputs.m": {"v": 1}})
    );
}

#[test]
fn the_runs_cancelled_or_failed_lately_are_listed() {
    let env = TestEnv::new("stopped_runs");
    let store = env.store();
    for run in [
        "cancelled",
        "failed",
        "running",
        "completed",
        "cancelled_long_ago",
    ] {
        store.create_run(run, &ctx(json!({}))).unwrap();
    }
    assert!(store.cancel_run("cancelled").unwrap());
    assert!(store.fail_run("failed", "broken").unwrap());
    assert!(store.complete_run("completed").unwrap().is_some());
    assert!(store.cancel_run("cancelled_long_ago").unwrap());
    env.pg
        .get()
        .unwrap()
        .execute(
            &format!(
                "UPDATE {} SET updated_at = NOW() - interval '1 hour' WHERE run_id = 'cancelled_long_ago'",
                env.tables.statuses
            ),
            &[],
        )
        .unwrap();
    let within = std::time::Duration::from_secs(10);
    let mut stopped = store.stopped_runs(within, 100).unwrap();
    stopped.sort();
    assert_eq!(stopped, vec!["cancelled".to_string(), "failed".to_string()]);
    assert_eq!(store.stopped_runs(within, 1).unwrap().len(), 1);
}
