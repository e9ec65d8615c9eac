//! Crash safety, duplicates, failures, bad messages, lost jobs, pauses and connection loss —
//! each against the real services.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::testing::amqp;
use flowcraft_rabbitmq::{NodeError, NodeRegistry, NodeResult, RedisCoordinationStore};
use serde_json::{json, Value};

/// `inc` that counts executions per node id.
fn counting_registry() -> (NodeRegistry, Arc<Mutex<HashMap<String, usize>>>) {
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let seen = counts.clone();
    let mut r = inc_registry();
    r.register_fn("inc", move |ctx| {
        *seen.lock().unwrap().entry(ctx.node_id.clone()).or_insert(0) += 1;
        Ok(NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) + 1
        )))
    });
    (r, counts)
}

fn raw_job(run: &str, blueprint: &str, node: &str) -> Vec<u8> {
    json!({"runId": run, "blueprintId": blueprint, "nodeId": node})
        .to_string()
        .into_bytes()
}

#[test]
fn duplicate_deliveries_apply_effects_once() {
    let env = TestEnv::new("dupes");
    let (diamond, expected) = workload("diamond8");
    let run = "dup-run".to_string();
    env.store().create_run(&run, &ContextMap::new()).unwrap();
    // The start job twice, before any worker runs, then a worker.
    env.publish_raw(&raw_job(&run, "diamond8", "start"));
    env.publish_raw(&raw_job(&run, "diamond8", "start"));
    let (registry, counts) = counting_registry();
    let worker = env.start_worker(registry, vec![diamond], 4);
    let row = env.wait_for_status(&run, "completed", WAIT);
    // And a duplicate of a branch and of the join after the run completed.
    env.publish_raw(&raw_job(&run, "diamond8", "b3"));
    env.publish_raw(&raw_job(&run, "diamond8", "join"));
    env.eventually("the queue drains", WAIT, || {
        env.queue_depth(&env.queue) == 0
    });
    // Stopping finishes and acks the jobs in flight: the duplicates have been handled.
    worker.stop().unwrap();
    assert_eq!(env.queue_depth(&env.queue), 0);
    let context = env.context(&run);
    for (node, value) in expected.as_object().unwrap() {
        assert_eq!(context[&format!("_outputs.{node}")], *value, "{node}");
    }
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.get("join"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("end"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&1), "{counts:?}");
    assert_eq!(row.result.unwrap()["context"]["_outputs.end"], json!(4));
}

/// The child process of a crash test: a worker that exits at the failpoint named by
/// `FLOWCRAFT_FAILPOINT` (or fails the test after a minute if it is never reached).
fn crash_child_worker(spec: &str) -> ! {
    let spec: Value = serde_json::from_str(spec).unwrap();
    let tables = flowcraft_rabbitmq::store::Tables::new(
        spec["contexts"].as_str().unwrap(),
        spec["statuses"].as_str().unwrap(),
        spec["webhooks"].as_str().unwrap(),
    )
    .unwrap();
    let (chain, _) = workload("chain5");
    let pg = flowcraft_rabbitmq::store::connect_pool(&postgres_url(), 4).unwrap();
    let redis = flowcraft_rabbitmq::coordination::connect_pool(&redis_url(), 4).unwrap();
    let worker = flowcraft_rabbitmq::RabbitMqAdapter::builder(amqp_url(), pg, redis)
        .registry(inc_registry())
        .blueprint(chain)
        .queue(spec["queue"].as_str().unwrap())
        .tables(tables)
        .redis_prefix(spec["prefix"].as_str().unwrap())
        .events_exchange(spec["events"].as_str().unwrap())
        .reconcile_every(None)
        .threads(1)
        .build()
        .unwrap()
        .start()
        .unwrap();
    // The failpoint ends this process; if it is never reached, fail after a while.
    std::thread::sleep(Duration::from_secs(60));
    worker.stop().unwrap();
    panic!("the failpoint was not reached");
}

/// A crash test: a child process — this test binary running `test` again, with
/// `FLOWCRAFT_TEST_CHILD` set — works on a run and exits at `point` on node n3.
fn crash_at(test: &str, point: &str) {
    if let Ok(spec) = std::env::var("FLOWCRAFT_TEST_CHILD") {
        crash_child_worker(&spec);
    }
    let env = TestEnv::new(&format!("crash_{point}"));
    let (chain, expected) = workload("chain5");
    let spec = json!({
        "contexts": env.tables.contexts, "statuses": env.tables.statuses, "webhooks": env.tables.webhooks,
        "queue": env.queue, "prefix": env.prefix, "events": env.events_exchange(),
    });
    let run = env.start_run(&chain, ContextMap::new());
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("FLOWCRAFT_TEST_CHILD", spec.to_string())
        .env("FLOWCRAFT_FAILPOINT", format!("{point}:n3"))
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(flowcraft_rabbitmq::testing::failpoint::FAILPOINT_EXIT_CODE),
        "child worker did not stop at the failpoint"
    );
    // n3's effects are committed, the run is not finished, and n3's message is back in the queue.
    let context = env.context(&run);
    assert_eq!(context["_outputs.n3"], json!(3));
    assert_eq!(env.store().status(&run).unwrap().unwrap().status, "running");
    // Another worker picks the redelivery up and finishes the run, effects once. (One
    // thread: after a crash after publish, n4 is queued twice — the dead worker's publish and
    // the redelivered n3's — and two threads could run both copies' node code at once, which
    // at-least-once execution allows; only one commit applies.)
    let (registry, counts) = counting_registry();
    let worker = env.start_worker(registry, vec![chain], 1);
    let row = env.wait_for_status(&run, "completed", WAIT);
    let final_context = &row.result.unwrap()["context"];
    for (node, value) in expected.as_object().unwrap() {
        assert_eq!(final_context[format!("_outputs.{node}")], *value, "{node}");
    }
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.get("n3"), None, "n3 must not run again: {counts:?}");
    assert_eq!(counts.get("n4"), Some(&1), "{counts:?}");
    worker.stop().unwrap();
}

#[test]
fn a_worker_killed_after_commit_loses_nothing() {
    crash_at("a_worker_killed_after_commit_loses_nothing", "after_commit");
}

#[test]
fn a_worker_killed_between_its_first_publish_and_redis_loses_nothing() {
    crash_at(
        "a_worker_killed_between_its_first_publish_and_redis_loses_nothing",
        "before_coordinate",
    );
}

#[test]
fn a_worker_killed_after_publish_loses_nothing() {
    crash_at(
        "a_worker_killed_after_publish_loses_nothing",
        "after_publish",
    );
}

#[test]
fn a_failed_node_fails_the_run_and_poisons_its_join() {
    let env = TestEnv::new("fail");
    let mut registry = inc_registry();
    registry.register_fn("boom", |_| Err(NodeError::new("the disk is on fire")));
    let b = bp(
        r#"{"id":"f","nodes":[{"id":"s","uses":"inc"},{"id":"ok","uses":"inc"},{"id":"bad","uses":"boom"},
        {"id":"join","uses":"inc"}],"edges":[{"source":"s","target":"ok"},{"source":"s","target":"bad"},
        {"source":"ok","target":"join"},{"source":"bad","target":"join"}]}"#,
    );
    let worker = env.start_worker(registry, vec![b.clone()], 2);
    let run = env.start_run(&b, ContextMap::new());
    let row = env.wait_for_status(&run, "failed", WAIT);
    let reason = row.result.unwrap()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("'bad'") && reason.contains("the disk is on fire"),
        "{reason}"
    );
    let poisoned: bool = redis::cmd("EXISTS")
        .arg(format!("{}fanin:poison:{run}:join", env.prefix))
        .query::<i64>(&mut *env.redis.get().unwrap())
        .unwrap()
        == 1;
    assert!(poisoned);
    // A job of the failed run still queued is acked without running.
    env.publish_raw(&raw_job(&run, "f", "join"));
    env.eventually("the queue drains", WAIT, || {
        env.queue_depth(&env.queue) == 0
    });
    // Stopping finishes and acks the jobs in flight: the join's job has been handled.
    worker.stop().unwrap();
    assert_eq!(env.queue_depth(&env.queue), 0);
    assert!(!env.context(&run).contains_key("_outputs.join"));
}

#[test]
fn bad_messages_go_to_the_dead_letter_queue_and_the_worker_goes_on() {
    let env = TestEnv::new("badmsg");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 2);
    env.publish_raw(b"{not json");
    env.publish_raw(br#"{"runId":"r1","nodeId":"n1"}"#);
    // Unknown blueprint: the run fails, the message is acked.
    env.store()
        .create_run("ghost-run", &ContextMap::new())
        .unwrap();
    env.publish_raw(&raw_job("ghost-run", "no-such-blueprint", "a"));
    let row = env.wait_for_status("ghost-run", "failed", WAIT);
    assert!(row.result.unwrap()["reason"]
        .as_str()
        .unwrap()
        .contains("unknown blueprint 'no-such-blueprint'"));
    env.eventually("two dead letters", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 2
    });
    let dead: Vec<String> = (0..2)
        .filter_map(|_| env.take_message(&env.dead_queue()))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    assert!(dead.contains(&"{not json".to_string()), "{dead:?}");
    // The worker goes on.
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    worker.stop().unwrap();
}

#[test]
fn a_version_mismatch_is_dead_lettered_without_touching_state() {
    let env = TestEnv::new("version");
    let v2 = bp(r#"{"id":"v","metadata":{"version":"2"},"nodes":[{"id":"a","uses":"inc"}]}"#);
    let initial = ctx(json!({"blueprintId": "v", "blueprintVersion": "1", "keep": true}));
    env.store().create_run("old-run", &initial).unwrap();
    env.publish_raw(&raw_job("old-run", "v", "a"));
    let worker = env.start_worker(inc_registry(), vec![v2], 1);
    env.eventually("the job is dead-lettered", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 1
    });
    assert_eq!(env.context("old-run"), initial);
    assert_eq!(
        env.store().status("old-run").unwrap().unwrap().status,
        "running"
    );
    worker.stop().unwrap();
}

/// Wraps node type `uses` so that a node for which `stop_at` says yes signals that it
/// entered and then waits (up to 30 s) for the gate before running. Returns the entered
/// receiver and the gate sender.
fn gate(
    registry: &mut NodeRegistry,
    uses: &str,
    stop_at: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (
    crossbeam_channel::Receiver<()>,
    crossbeam_channel::Sender<()>,
) {
    let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(1);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let inner = registry.get(uses).unwrap();
    registry.register_fn(uses, move |ctx| {
        if stop_at(&ctx.node_id) {
            let _ = entered_tx.send(());
            let _ = gate_rx.recv_timeout(Duration::from_secs(30));
        }
        inner.execute(ctx)
    });
    (entered_rx, gate_tx)
}

/// Runs `bp` on a one-thread worker until the node for which `stop_at` says yes starts
/// (`uses` is wrapped), then stops the worker consuming and lets that node finish: its
/// successors stay queued. Returns the run.
fn run_until_stopped(
    env: &TestEnv,
    mut registry: NodeRegistry,
    bp: &flowcraft_rabbitmq::Blueprint,
    uses: &str,
    stop_at: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> String {
    let (entered_rx, gate_tx) = gate(&mut registry, uses, stop_at);
    let worker = env
        .worker(registry, vec![bp.clone()])
        .threads(1)
        .prefetch(1)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let run = env.start_run(bp, ContextMap::new());
    entered_rx
        .recv_timeout(WAIT)
        .expect("the node to stop at starts");
    worker.shutdown();
    env.eventually("the worker stops consuming", WAIT, || {
        env.consumer_count(&env.queue) == 0
    });
    gate_tx.send(()).unwrap();
    worker.join().unwrap();
    run
}

#[test]
fn the_reconciler_finishes_a_run_whose_next_job_was_purged() {
    let env = TestEnv::new("purge");
    let (chain, expected) = workload("chain5");
    // Stop consuming while n2 runs; n2 finishes, publishes n3 and is acked; n3 stays queued.
    let run = run_until_stopped(&env, inc_registry(), &chain, "inc", |n| n == "n2");
    env.eventually("n3 is queued", WAIT, || env.queue_depth(&env.queue) == 1);
    assert_eq!(env.purge(), 1);
    let (reconciler, handle) =
        env.reconciling_worker(inc_registry(), vec![chain], 2, Duration::ZERO);
    let stats = reconciler.run().unwrap();
    assert_eq!(
        (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs),
        (1, 1, 0),
        "{stats:?}"
    );
    let row = env.wait_for_status(&run, "completed", WAIT);
    for (node, value) in expected.as_object().unwrap() {
        assert_eq!(
            row.result.as_ref().unwrap()["context"][format!("_outputs.{node}")],
            *value
        );
    }
    handle.stop().unwrap();
}

#[test]
fn a_run_whose_coordination_state_was_lost_still_runs_its_join_before_completing() {
    let env = TestEnv::new("lost_redis");
    let b = bp(
        r#"{"id":"v","nodes":[{"id":"s","uses":"inc"},{"id":"a","uses":"inc"},{"id":"b","uses":"inc"},
        {"id":"j","uses":"inc","config":{"joinStrategy":"all"}}],
        "edges":[{"source":"s","target":"a"},{"source":"s","target":"b"},
        {"source":"a","target":"j"},{"source":"b","target":"j"}]}"#,
    );
    let run = run_until_stopped(&env, inc_registry(), &b, "inc", |n| n == "a");
    // `a` reported to the join; then `b`'s job is lost, and Redis forgets everything (the
    // ledger and the join's report from `a`).
    env.eventually("b is queued", WAIT, || env.queue_depth(&env.queue) == 1);
    assert_eq!(env.purge(), 1);
    assert!(env.forget_coordination() > 0);
    let (registry, counts) = counting_registry();
    let (reconciler, handle) = env.reconciling_worker(registry, vec![b], 2, Duration::ZERO);
    let stats = reconciler.run().unwrap();
    assert_eq!(
        (stats.reconciled_runs, stats.failed_runs),
        (1, 0),
        "{stats:?}"
    );
    // `b`'s report alone does not satisfy the join Redis now knows, and Redis has no other
    // job of the run: it calls the run idle. The stored context says `j` must still run.
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.j"], json!(3), "{context}");
    assert_eq!(counts.lock().unwrap().get("j"), Some(&1));
    handle.stop().unwrap();
}

#[test]
fn the_reconciler_finishes_a_batch_inside_a_loop_whose_worker_job_was_purged() {
    let env = TestEnv::new("purge_batch_loop");
    let bp = example("batch-loop");
    // Stop at the first batch worker of the second round.
    let first_worker_runs = AtomicUsize::new(0);
    let run = run_until_stopped(&env, inc_registry(), &bp, "transform", move |n| {
        n == "gather#0" && first_worker_runs.fetch_add(1, Ordering::SeqCst) == 1
    });
    // The second round's other worker job is lost, and so is Redis's state (a restart
    // without persistence): only the stored context tells what is left to do.
    env.eventually("the other worker job is queued", WAIT, || {
        env.queue_depth(&env.queue) == 1
    });
    assert_eq!(env.purge(), 1);
    assert!(env.forget_coordination() > 0);
    let (reconciler, handle) = env.reconciling_worker(inc_registry(), vec![bp], 2, Duration::ZERO);
    // The first pass re-enqueues the lost worker. Its report reaches a join that forgot the
    // other worker; the ledger, remade without the run's start, cannot vouch that the run is
    // idle, so the worker reads the context, finds the round's workers all done, and enqueues
    // the gather.
    env.eventually("the run completes", WAIT, || {
        let stats = reconciler.run().unwrap();
        assert_eq!(stats.failed_runs, 0, "{stats:?}");
        env.store().status(&run).unwrap().unwrap().status == "completed"
    });
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.done"], json!(30), "{context}");
    assert_eq!(context["_outputs.gather"], json!([30, 20]), "{context}");
    handle.stop().unwrap();
}

/// Run `r1` of a one-node blueprint whose node `a` is committed with output 1, and the
/// Redis ledger of this test.
fn run_with_a_committed(env: &TestEnv) -> (flowcraft_rabbitmq::Blueprint, RedisCoordinationStore) {
    let one = bp(r#"{"id":"one","nodes":[{"id":"a","uses":"inc"}]}"#);
    let store = env.store();
    let mut context = ContextMap::new();
    one.stamp(&mut context);
    store.create_run("r1", &context).unwrap();
    let (commit, guard) = commit_of("a", json!(1));
    assert!(store.commit_node("r1", commit, guard).unwrap());
    let coord = RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone());
    (one, coord)
}

#[test]
fn the_reconciler_finishes_a_job_committed_by_a_worker_that_vanished() {
    let env = TestEnv::new("recovered");
    // A worker made `a` ready, committed it and vanished before its Redis step, and its
    // message is gone: `a` is committed, but its ledger entry never closed.
    let (one, coord) = run_with_a_committed(&env);
    coord.register_jobs("r1", &["a".to_string()]).unwrap();
    let (registry, counts) = counting_registry();
    let (reconciler, handle) = env.reconciling_worker(registry, vec![one], 1, Duration::ZERO);
    let stats = reconciler.run().unwrap();
    assert_eq!(
        (stats.stalled_runs, stats.reconciled_runs),
        (1, 1),
        "{stats:?}"
    );
    // The reconciler's copy of `a` is not a plain duplicate: it closes `a` in the ledger
    // (without running it again), and the run completes.
    let row = env.wait_for_status("r1", "completed", WAIT);
    assert_eq!(row.result.unwrap()["context"]["_outputs.a"], json!(1));
    assert_eq!(counts.lock().unwrap().get("a"), None);
    handle.stop().unwrap();
}

/// A run whose last job coordinated but whose completion was lost: the worker's reconciler
/// completes it, and the worker's listeners hear of it as of any run it completes.
#[test]
fn a_run_the_reconciler_completes_is_reported_finished() {
    let env = TestEnv::new("reconciled_finish");
    let (one, coord) = run_with_a_committed(&env);
    let finished = coord
        .finish_job("r1", "a", &["a".to_string()], &[])
        .unwrap();
    assert!(finished.run_idle && finished.ledger_intact);
    let mut registry = inc_registry();
    let (tx, rx) = crossbeam_channel::unbounded();
    registry.listen(move |e: &flowcraft_rabbitmq::FlowEvent| {
        let _ = tx.send(e.clone());
    });
    let (reconciler, handle) = env.reconciling_worker(registry, vec![one], 1, Duration::ZERO);
    reconciler.run().unwrap();
    env.wait_for_status("r1", "completed", WAIT);
    let event = rx.recv_timeout(WAIT).expect("the run's workflow:finish");
    assert_eq!(event.kind, flowcraft_rabbitmq::EventKind::WorkflowFinish);
    assert_eq!(
        (event.run_id.as_str(), event.status.as_deref()),
        ("r1", Some("completed"))
    );
    handle.stop().unwrap();
}

#[test]
fn a_run_started_exactly_like_the_seed_client_completes() {
    let env = TestEnv::new("seed");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain], 2);
    let run = uuid::Uuid::new_v4().to_string();
    {
        let mut pg = env.pg.get().unwrap();
        pg.execute(
            &format!(
                "INSERT INTO {} (run_id, context_data) VALUES ($1, $2)",
                env.tables.contexts
            ),
            &[&run, &json!({})],
        )
        .unwrap();
        pg.execute(
            &format!(
                "INSERT INTO {} (run_id, status) VALUES ($1, $2)",
                env.tables.statuses
            ),
            &[&run, &"running"],
        )
        .unwrap();
    }
    // A plain publish (no confirms, default exchange, persistent), as amqplib's sendToQueue.
    let mut conn = amqp::connect(&amqp_url()).unwrap();
    let ch = conn.open_channel(None).unwrap();
    // assertQueue(queue, {durable: true}), exactly: no arguments.
    ch.queue_declare(
        env.queue.clone(),
        amiquip::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )
    .unwrap();
    ch.basic_publish(
        "",
        amiquip::Publish::with_properties(
            &raw_job(&run, "chain5", "n1"),
            env.queue.clone(),
            amqp::persistent_json(),
        ),
    )
    .unwrap();
    conn.close().unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(row.result.unwrap()["context"]["_outputs.n5"], json!(5));
    worker.stop().unwrap();
}

#[test]
fn wait_resume_and_cancel() {
    let env = TestEnv::new("resume");
    let b = bp(
        r#"{"id":"w","nodes":[{"id":"a","uses":"inc"},{"id":"w","uses":"wait"},
        {"id":"yes","uses":"inc"},{"id":"no","uses":"inc"}],
        "edges":[{"source":"a","target":"w"},{"source":"w","target":"yes","action":"approve"},
        {"source":"w","target":"no","action":"reject"}]}"#,
    );
    let worker = env.start_worker(inc_registry(), vec![b.clone()], 2);
    let client = env.client(vec![b]);
    let run = client.start_workflow("w", ContextMap::new()).unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    assert_eq!(env.context(&run)["_awaitingNodeIds"], json!(["w"]));
    let resumed = client
        .resume_with_action(&run, Some("approve"), json!(41))
        .unwrap();
    assert_eq!(resumed, vec!["w".to_string()]);
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_resume.action"], json!("approve"));
    assert_eq!(context["_outputs.yes"], json!(42));
    assert!(context.get("_outputs.no").is_none());
    // Resuming a run that is not awaiting is an error and changes nothing.
    let err = client
        .resume_with_action(&run, Some("approve"), json!(0))
        .unwrap_err();
    assert!(err.to_string().contains("not awaiting"), "{err}");
    // Cancel: a second run is cancelled while awaiting; its queued jobs are dropped.
    let other = client.start_workflow("w", ContextMap::new()).unwrap();
    env.wait_for_status(&other, "awaiting", WAIT);
    client.cancel(&other).unwrap();
    env.publish_raw(&raw_job(&other, "w", "yes"));
    env.eventually("the queue drains", WAIT, || {
        env.queue_depth(&env.queue) == 0
    });
    assert!(!env.context(&other).contains_key("_outputs.yes"));
    assert_eq!(
        env.store().status(&other).unwrap().unwrap().status,
        "cancelled"
    );
    assert!(client
        .cancel(&other)
        .unwrap_err()
        .to_string()
        .contains("cancelled"));
    assert!(client
        .cancel("no-such-run")
        .unwrap_err()
        .to_string()
        .contains("does not exist"));
    worker.stop().unwrap();
}

#[test]
fn the_worker_reconnects_after_the_broker_closes_its_connection() {
    let env = TestEnv::new("reconnect");
    let (chain, _) = workload("chain5");
    let name = format!("flowcraft-test-{}", env.tag);
    let worker = env
        .worker(inc_registry(), vec![chain.clone()])
        .connection_name(name.clone())
        .threads(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let client = env.client(vec![chain]);
    let run = client.start_workflow("chain5", ContextMap::new()).unwrap();
    env.wait_for_status(&run, "completed", WAIT);
    // Close exactly this worker's connection, as an operator (or a broker restart) would.
    let mut closed = false;
    env.eventually("the worker's connection is closed", WAIT, || {
        let listing = Command::new("rabbitmqctl")
            .args(["list_connections", "-q", "pid", "client_properties"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            if line.contains(&name) {
                let pid = line.split('\t').next().unwrap_or_default();
                let status = Command::new("rabbitmqctl")
                    .args(["close_connection", pid, "test closes it"])
                    .status()
                    .unwrap();
                closed |= status.success();
            }
        }
        closed
    });
    let run = client.start_workflow("chain5", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", Duration::from_secs(60));
    assert_eq!(row.result.unwrap()["context"]["_outputs.n5"], json!(5));
    worker.stop().unwrap();
}

#[test]
fn sleeping_nodes_do_not_pin_database_connections() {
    let env = TestEnv::new("pool1");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let mut registry = inc_registry();
    registry.register_fn("nap", move |_| {
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(2));
        r.fetch_sub(1, Ordering::SeqCst);
        Ok(NodeResult::output(Value::Null))
    });
    let b = bp(
        r#"{"id":"naps","nodes":[{"id":"s","uses":"inc"},{"id":"a","uses":"nap"},{"id":"b","uses":"nap"},
        {"id":"c","uses":"nap"},{"id":"d","uses":"nap"}],"edges":[{"source":"s","target":"a"},
        {"source":"s","target":"b"},{"source":"s","target":"c"},{"source":"s","target":"d"}]}"#,
    );
    let pool_of_one = flowcraft_rabbitmq::store::connect_pool(&postgres_url(), 1).unwrap();
    let worker = env
        .worker_with(pool_of_one, env.redis.clone(), registry, vec![b.clone()])
        .threads(4)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let run = env.start_run(&b, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "all four sleeping nodes ran at once on a pool of one connection"
    );
    worker.stop().unwrap();
}

#[test]
fn a_long_node_keeps_its_run_from_looking_stalled() {
    let env = TestEnv::new("heartbeat");
    let mut registry = inc_registry();
    let (entered_rx, gate_tx) = gated_node(&mut registry, "long", json!("done"));
    let b = bp(r#"{"id":"long","nodes":[{"id":"a","uses":"long"}]}"#);
    let worker = env
        .worker(registry, vec![b.clone()])
        .stalled_after(Duration::from_secs(3))
        .build()
        .unwrap()
        .start()
        .unwrap();
    let run = env.start_run(&b, ContextMap::new());
    entered_rx.recv_timeout(WAIT).expect("the node starts");
    let before = env.store().status(&run).unwrap().unwrap().updated_at;
    env.eventually("the heartbeat moves updated_at", WAIT, || {
        env.store().status(&run).unwrap().unwrap().updated_at != before
    });
    gate_tx.send(()).unwrap();
    env.wait_for_status(&run, "completed", WAIT);
    worker.stop().unwrap();
}

#[test]
fn postgres_connections_killed_mid_run_are_replaced_and_the_run_completes() {
    let env = TestEnv::new("pgkill");
    let (chain, expected) = workload("chain5");
    let app = format!("fc_{}", env.tag);
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut registry = inc_registry();
    let (entered_rx, gate_tx) = gate(&mut registry, "inc", move |n| {
        n == "n2" && first.swap(false, Ordering::SeqCst)
    });
    let separator = if postgres_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let pool = flowcraft_rabbitmq::store::connect_pool(
        &format!("{}{separator}application_name={app}", postgres_url()),
        4,
    )
    .unwrap();
    let worker = env
        .worker_with(pool, env.redis.clone(), registry, vec![chain.clone()])
        .threads(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let run = env.start_run(&chain, ContextMap::new());
    entered_rx.recv_timeout(WAIT).expect("n2 starts");
    // Every connection of the worker's pool dies while n2 runs.
    let killed: i64 = env
        .pg
        .get()
        .unwrap()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed > 0, "the worker had pooled connections");
    gate_tx.send(()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    for (node, value) in expected.as_object().unwrap() {
        assert_eq!(
            row.result.as_ref().unwrap()["context"][format!("_outputs.{node}")],
            *value
        );
    }
    worker.stop().unwrap();
}
