//! The distributed worker against the real RabbitMQ, PostgreSQL and Redis.

mod common;

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::LocalRuntime;
use serde_json::json;

#[test]
fn workloads_complete_with_expected_outputs() {
    let env = TestEnv::new("workloads");
    let (chain, chain_expected) = workload("chain5");
    let (diamond, diamond_expected) = workload("diamond8");
    let worker = env.start_worker(inc_registry(), vec![chain.clone(), diamond.clone()], 4);
    let client = env.client(vec![chain, diamond]);
    let runs: Vec<(String, serde_json::Value)> = (0..5)
        .flat_map(|_| {
            [
                (
                    client.start_workflow("chain5", ContextMap::new()).unwrap(),
                    chain_expected.clone(),
                ),
                (
                    client
                        .start_workflow("diamond8", ContextMap::new())
                        .unwrap(),
                    diamond_expected.clone(),
                ),
            ]
        })
        .collect();
    for (run, expected) in &runs {
        let row = env.wait_for_status(run, "completed", WAIT);
        let result = row.result.unwrap();
        assert_eq!(result["status"], json!("completed"));
        let context = &result["context"];
        for (node, value) in expected.as_object().unwrap() {
            assert_eq!(context[format!("_outputs.{node}")], *value, "{run} {node}");
        }
        let serialized: serde_json::Value =
            serde_json::from_str(result["serializedContext"].as_str().unwrap()).unwrap();
        assert_eq!(&serialized, context);
    }
    worker.stop().unwrap();
}

/// With many threads and many runs, job tails are handed off and run in batches by whichever
/// thread leads (`src/worker/tail.rs`): every node still executes once and commits once,
/// every run completes with the expected outputs, and every delivery is acked (after a
/// clean stop, nothing is left in the queue: an unsettled delivery would return to it).
#[test]
fn many_threads_and_runs_each_node_runs_once_and_every_delivery_is_acked() {
    const RUNS: usize = 40;
    let env = TestEnv::new("tails");
    let (chain, chain_expected) = workload("chain5");
    let (diamond, diamond_expected) = workload("diamond8");
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let client = env.client(vec![chain.clone(), diamond.clone()]);
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        for (id, expected) in [("chain5", &chain_expected), ("diamond8", &diamond_expected)] {
            let run = client.start_workflow(id, ContextMap::new()).unwrap();
            runs.push((run, expected.clone()));
        }
    }
    // Every run is queued before the worker starts, so its threads always have work.
    let registry = counting_everything(&counts);
    let worker = env.start_worker(registry, vec![chain.clone(), diamond.clone()], 8);
    for (run, expected) in &runs {
        let row = env.wait_for_status(run, "completed", WAIT);
        let context = &row.result.unwrap()["context"];
        for (node, value) in expected.as_object().unwrap() {
            assert_eq!(context[format!("_outputs.{node}")], *value, "{run} {node}");
        }
    }
    // A clean stop waits until every delivery in flight is settled: bounded here, so that a
    // delivery a tail never settled fails the test instead of hanging it.
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || stopped_tx.send(worker.stop()));
    stopped
        .recv_timeout(WAIT)
        .expect("the worker did not stop: a delivery was never settled")
        .unwrap();
    let counts = counts.lock().unwrap();
    let nodes = chain.node_count() * RUNS + diamond.node_count() * RUNS;
    assert_eq!(counts.len(), nodes, "some node never ran");
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "nodes that ran more than once: {twice:?}");
    assert_eq!(env.queue_depth(&env.queue), 0, "a delivery was not acked");
}

#[test]
fn same_final_context_as_the_in_process_runner() {
    let mut env = TestEnv::new("parity");
    // retry-fallback.json retries after 10 ms through a delay queue.
    env.extra_queues.push(format!("{}.delay.10", env.queue));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blueprints");
    let (blueprints, problems) = flowcraft_rabbitmq::blueprint::load_dir(dir);
    assert!(problems.is_empty(), "{problems:?}");
    let ids = [
        "diamond",
        "routing",
        "conditions",
        "transform",
        "retry-fallback",
        "any-join",
        "loop",
        "batch",
        "batch-loop",
    ];
    let all: Vec<_> = blueprints.values().cloned().collect();
    let worker = env.start_worker(inc_registry(), all.clone(), 4);
    let client = env.client(all.clone());
    let local = LocalRuntime::builder(inc_registry())
        .blueprints(all)
        .build();
    for id in ids {
        let run = client.start_workflow(id, ContextMap::new()).unwrap();
        let row = env.wait_for_status(&run, "completed", WAIT);
        let distributed = row.result.unwrap()["context"].as_object().unwrap().clone();
        let in_process = local.run_by_id(id, ContextMap::new()).unwrap();
        assert_eq!(
            in_process.status,
            flowcraft_rabbitmq::RunStatus::Completed,
            "{id}"
        );
        // Which mirror an `any` join hears first differs between runs.
        let outputs = |c: &ContextMap| {
            let mut o = sorted_outputs(c);
            o.retain(|(k, _)| !(id == "any-join" && k == "_outputs.first"));
            o
        };
        assert_eq!(outputs(&distributed), outputs(&in_process.context), "{id}");
        assert_eq!(distributed.contains_key("_outputs.first"), id == "any-join");
    }
    worker.stop().unwrap();
}

/// A context's `_outputs.*` entries, sorted by key.
fn sorted_outputs(context: &ContextMap) -> Vec<(String, serde_json::Value)> {
    let mut outputs: Vec<_> = context
        .iter()
        .filter(|(k, _)| k.starts_with("_outputs."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    outputs.sort_by(|a, b| a.0.cmp(&b.0));
    outputs
}

/// Every node's executions per run, for every node type the shapes below use.
fn counting_everything(
    counts: &std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, String), usize>>>,
) -> flowcraft_rabbitmq::NodeRegistry {
    let mut registry = inc_registry();
    registry.register_fn("boom", |_| Err(flowcraft_rabbitmq::NodeError::new("boom")));
    for uses in [
        "boom",
        "inc",
        "transform",
        "loop-controller",
        "batch-scatter",
        "batch-gather",
    ] {
        let inner = registry.get(uses).unwrap();
        let seen = counts.clone();
        registry.register_fn(uses, move |ctx| {
            *seen
                .lock()
                .unwrap()
                .entry((ctx.run_id.clone(), ctx.node_id.clone()))
                .or_insert(0) += 1;
            inner.execute(ctx)
        });
    }
    registry
}

#[test]
fn loops_joins_and_batches_run_each_node_as_in_process_and_leave_no_frontier() {
    let shapes = [
        // An `any` join after a loop, also fed by a parallel branch.
        r#"{"id":"any-after-loop","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"transform","params":{"expression":"(context['_outputs.body'] ?? 0) + 1"}},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.body < 3"}},
        {"id":"other","uses":"inc"},{"id":"done","uses":"inc","config":{"joinStrategy":"any"}},
        {"id":"after","uses":"inc"}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},
        {"source":"ctl","target":"body","action":"continue"},{"source":"ctl","target":"done","action":"break"},
        {"source":"init","target":"other"},{"source":"other","target":"done"},{"source":"done","target":"after"}]}"#,
        // An `all` join at a loop's entry.
        r#"{"id":"join-into-loop","nodes":[{"id":"s","uses":"inc"},{"id":"a","uses":"inc"},{"id":"b","uses":"inc"},
        {"id":"j","uses":"transform","params":{"expression":"(context['_outputs.j'] ?? 0) + 1"},"config":{"joinStrategy":"all"}},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.j < 5"}},
        {"id":"done","uses":"inc"}],
        "edges":[{"source":"s","target":"a"},{"source":"s","target":"b"},{"source":"a","target":"j"},
        {"source":"b","target":"j"},{"source":"j","target":"ctl"},
        {"source":"ctl","target":"j","action":"continue"},{"source":"ctl","target":"done","action":"break"}]}"#,
        // A batch after a loop that ran three times.
        r#"{"id":"batch-after-loop","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"transform","params":{"expression":"(context['_outputs.body'] ?? 0) + 1"}},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.body < 3"}},
        {"id":"items","uses":"transform","params":{"expression":"[1, 2, 3]"}},
        {"id":"scatter","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"gather"}},
        {"id":"gather","uses":"batch-gather"},{"id":"done","uses":"transform","params":{"expression":"input"}}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},
        {"source":"ctl","target":"body","action":"continue"},{"source":"ctl","target":"items","action":"break"},
        {"source":"items","target":"scatter"},{"source":"scatter","target":"gather"},{"source":"gather","target":"done"}]}"#,
        // A batch inside a second loop.
        r#"{"id":"batch-in-second-loop","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"transform","params":{"expression":"(context['_outputs.body'] ?? 0) + 1"}},
        {"id":"ctl1","uses":"loop-controller","params":{"condition":"_outputs.body < 2"}},
        {"id":"items","uses":"transform","params":{"expression":"[(context['_outputs.gather'] ?? [0])[0], 5]"}},
        {"id":"scatter","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"gather"}},
        {"id":"gather","uses":"batch-gather"},
        {"id":"ctl2","uses":"loop-controller","params":{"condition":"_outputs.gather[0] < 3"}},
        {"id":"done","uses":"transform","params":{"expression":"input"}}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl1"},
        {"source":"ctl1","target":"body","action":"continue"},{"source":"ctl1","target":"items","action":"break"},
        {"source":"items","target":"scatter"},{"source":"scatter","target":"gather"},{"source":"gather","target":"ctl2"},
        {"source":"ctl2","target":"items","action":"continue"},{"source":"ctl2","target":"done","action":"break"}]}"#,
        // A fallback whose own edges' conditions read a key written later.
        r#"{"id":"fallback-conditions","nodes":[{"id":"s","uses":"inc"},
        {"id":"n","uses":"boom","config":{"fallback":"f"}},{"id":"f","uses":"inc"},
        {"id":"a","uses":"inc"},{"id":"b","uses":"inc"},{"id":"late","uses":"inc"}],
        "edges":[{"source":"s","target":"n"},
        {"source":"f","target":"a","condition":"_outputs.late == null"},
        {"source":"f","target":"b","condition":"_outputs.late != null"},
        {"source":"a","target":"late"}]}"#,
        // An empty batch.
        r#"{"id":"empty-batch","nodes":[{"id":"scatter","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"gather"}},
        {"id":"gather","uses":"batch-gather"}],"edges":[{"source":"scatter","target":"gather"}]}"#,
    ];
    let mut env = TestEnv::new("shapes");
    // retry-fallback.json retries after 10 ms through a delay queue.
    env.extra_queues.push(format!("{}.delay.10", env.queue));
    let mut blueprints: Vec<_> = shapes.iter().map(|s| bp(s)).collect();
    blueprints.extend(
        [
            "batch-loop",
            "loop",
            "diamond",
            "routing",
            "conditions",
            "retry-fallback",
        ]
        .map(example),
    );
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let registry = counting_everything(&counts);
    let worker = env.start_worker(registry.clone(), blueprints.clone(), 4);
    let client = env.client(blueprints.clone());
    let local = LocalRuntime::builder(registry)
        .blueprints(blueprints.clone())
        .build();
    for b in &blueprints {
        let id = b.id();
        let initial = if id == "empty-batch" {
            ctx(json!({"_inputs.scatter": []}))
        } else {
            ContextMap::new()
        };
        let run = client.start_workflow(id, initial.clone()).unwrap();
        let row = env.wait_for_status(&run, "completed", WAIT);
        let distributed = row.result.unwrap()["context"].as_object().unwrap().clone();
        let in_process = local.run_by_id(id, initial).unwrap();
        assert_eq!(
            in_process.status,
            flowcraft_rabbitmq::RunStatus::Completed,
            "{id}"
        );
        assert_eq!(
            sorted_outputs(&distributed),
            sorted_outputs(&in_process.context),
            "{id}"
        );
        let executions = |run: &str| -> Vec<(String, usize)> {
            let mut v: Vec<_> = counts
                .lock()
                .unwrap()
                .iter()
                .filter(|((r, _), _)| r == run)
                .map(|((_, node), n)| (node.clone(), *n))
                .collect();
            v.sort();
            v
        };
        assert_eq!(executions(&run), executions(&in_process.run_id), "{id}");
        // Nothing is left to run: a reconciler or a check after lost Redis state would
        // enqueue nothing.
        assert_eq!(
            flowcraft_rabbitmq::testing::scheduling::frontier(b, &distributed),
            Vec::<(String, u32)>::new(),
            "{id}"
        );
    }
    worker.stop().unwrap();
}

#[test]
fn the_worker_stores_outputs_under_the_bare_node_id_too() {
    let env = TestEnv::new("bareid");
    let b = bp(r#"{"id":"bare","nodes":[
        {"id":"fetch","uses":"transform","params":{"expression":"{total: 150}"}},
        {"id":"big","uses":"transform","params":{"expression":"'big'"}},
        {"id":"small","uses":"transform","params":{"expression":"'small'"}},
        {"id":"nap","uses":"wait"}],
        "edges":[{"source":"fetch","target":"big","condition":"fetch.total > 100"},
                 {"source":"fetch","target":"small","condition":"fetch.total <= 100"},
                 {"source":"big","target":"nap"}]}"#);
    let worker = env.start_worker(inc_registry(), vec![b.clone()], 2);
    let run = env.start_run(&b, ContextMap::new());
    env.wait_for_status(&run, "awaiting", WAIT);
    let context = env.context(&run);
    assert_eq!(context["fetch"], json!({"total": 150}));
    assert_eq!(context.get("_outputs.big"), Some(&json!("big")));
    assert_eq!(context.get("_outputs.small"), None, "the wrong branch ran");
    assert_eq!(
        context["_awaitingDetails"]["nap"]["reason"],
        json!("external_event")
    );
    worker.stop().unwrap();
}

#[test]
fn retries_are_queued_with_their_delay_and_hold_no_thread() {
    let mut env = TestEnv::new("retries");
    env.extra_queues.push(format!("{}.delay.1500", env.queue));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let mut registry = inc_registry();
    let attempts = seen.clone();
    registry.register_fn("flaky", move |ctx| {
        attempts.lock().unwrap().push(ctx.attempt);
        if ctx.attempt < 3 {
            return Err(flowcraft_rabbitmq::NodeError::new("not yet"));
        }
        Ok(flowcraft_rabbitmq::NodeResult::output(json!(ctx.attempt)))
    });
    let flaky = bp(r#"{"id":"flaky","nodes":[
        {"id":"f","uses":"flaky","config":{"maxRetries":3,"retryDelay":1500}},
        {"id":"after","uses":"inc"}],"edges":[{"source":"f","target":"after"}]}"#);
    let (chain, _) = workload("chain5");
    // One thread: if it waited out the retry delays, nothing else could run meanwhile.
    let worker = env.start_worker(registry, vec![flaky.clone(), chain.clone()], 1);
    let run = env.start_run(&flaky, ContextMap::new());
    env.eventually("the first attempt failed", WAIT, || {
        !seen.lock().unwrap().is_empty()
    });
    let other = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&other, "completed", WAIT);
    assert!(
        seen.lock().unwrap().len() < 3,
        "another run went through while the retries waited: {:?}",
        seen.lock().unwrap()
    );
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![1, 2, 3],
        "attempts counted across deliveries"
    );
    assert_eq!(row.result.unwrap()["context"]["_outputs.f"], json!(3));
    worker.stop().unwrap();
}

#[test]
fn a_batch_s_chunk_size_bounds_its_workers_in_flight_across_the_worker_pool() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = TestEnv::new("chunks");
    let (now, most) = (
        std::sync::Arc::new(AtomicUsize::new(0)),
        std::sync::Arc::new(AtomicUsize::new(0)),
    );
    let (n, m) = (now.clone(), most.clone());
    let mut registry = inc_registry();
    registry.register_fn("slow", move |ctx| {
        let inside = n.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(inside, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        n.fetch_sub(1, Ordering::SeqCst);
        Ok(flowcraft_rabbitmq::NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) * 2
        )))
    });
    let b = bp(r#"{"id":"chunked","nodes":[
        {"id":"items","uses":"transform","params":{"expression":"context.items"}},
        {"id":"s","uses":"batch-scatter","params":{"workerUsesKey":"slow","gatherNodeId":"g","chunkSize":3}},
        {"id":"g","uses":"batch-gather"}],
        "edges":[{"source":"items","target":"s"},{"source":"s","target":"g"}]}"#);
    let worker = env.start_worker(registry, vec![b.clone()], 8);
    let items: Vec<i64> = (0..15).collect();
    let run = env.start_run(&b, ctx(json!({"items": items})));
    let row = env.wait_for_status(&run, "completed", WAIT);
    let expected: Vec<i64> = (0..15).map(|i| i * 2).collect();
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.g"],
        json!(expected)
    );
    let most = most.load(Ordering::SeqCst);
    assert!((1..=3).contains(&most), "{most} workers ran at once");
    worker.stop().unwrap();
}

#[test]
fn flowcraft_s_counter_loop_counts_to_five_on_the_worker() {
    let env = TestEnv::new("counter");
    let (b, registry) = flowcraft_counter_loop();
    let worker = env.start_worker(registry, vec![b.clone()], 2);
    let run = env.start_run(&b, ContextMap::new());
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["count"], json!(5));
    assert_eq!(context["increment"], json!(5));
    worker.stop().unwrap();
}

#[test]
fn flowcraft_s_guides_give_the_same_results_on_the_worker() {
    let env = TestEnv::new("guides");
    let (batch, batch_registry) = flowcraft_batch_guide();
    let worker = env.start_worker(batch_registry, vec![batch.clone()], 4);
    let run = env.start_run(&batch, ContextMap::new());
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["doubled"], json!([20, 40, 60]));
    assert_eq!(context["_outputs.sum-results"], json!(120));
    worker.stop().unwrap();

    let (fallback, fallback_registry) = flowcraft_fallback_guide();
    let worker = env.start_worker(fallback_registry, vec![fallback.clone()], 4);
    let run = env.start_run(&fallback, ContextMap::new());
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.process-data"],
        json!("Processed: Data from secondary API")
    );
    worker.stop().unwrap();
}

#[test]
fn the_worker_serves_metrics_and_health() {
    let env = TestEnv::new("metrics");
    let (chain, _) = workload("chain5");
    let (worker, addr) =
        TestEnv::start_serving_metrics(env.worker(inc_registry(), vec![chain.clone()]).threads(2));
    let get = |path: &str| http_get(addr, path, &[]);
    assert_eq!(get("/healthz").0, 200);
    env.eventually("the worker is ready", WAIT, || get("/readyz").0 == 200);
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    env.eventually("five acked jobs are counted", WAIT, || {
        get("/metrics")
            .1
            .contains("flowcraft_jobs_total{outcome=\"ack\"} 5")
    });
    let (_, metrics) = get("/metrics");
    assert!(
        metrics.contains("flowcraft_node_duration_seconds_count{uses=\"inc\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowcraft_deliveries_in_flight"),
        "{metrics}"
    );
    // The body parses as Prometheus text: `# HELP`/`# TYPE` lines and samples
    // `name{labels} value`, every value a number.
    let body = &metrics;
    let mut samples = std::collections::HashMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("a sample is `name value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        assert!(
            name.starts_with("flowcraft_") && !name.contains(&run),
            "labels never hold a run id: {line}"
        );
        samples.insert(name.to_string(), value);
    }
    for (sample, want) in [
        ("flowcraft_runs_total{outcome=\"started\"}", 1.0),
        ("flowcraft_runs_total{outcome=\"completed\"}", 1.0),
        ("flowcraft_job_latency_seconds_count", 5.0),
    ] {
        assert_eq!(samples.get(sample), Some(&want), "{sample} in {body}");
    }
    // n2…n5 were each published to an idle worker, their run state derived from their
    // predecessor's commit (no statement) and taken by their delivery.
    for outcome in ["derived", "used"] {
        assert_eq!(
            samples.get(&format!(
                "flowcraft_read_ahead_total{{outcome=\"{outcome}\"}}"
            )),
            Some(&4.0),
            "{outcome} in {body}"
        );
    }
    let commits = samples["flowcraft_commit_batch_size_count"];
    assert!((1.0..=5.0).contains(&commits), "{body}");
    assert_eq!(samples["flowcraft_commit_batch_size_sum"], 5.0, "{body}");
    worker.stop().unwrap();
}

/// Successors held back by a backlog for longer than half a second take the state derived
/// from their predecessor's commit only while the worker's list of runs stopped lately says
/// their run goes on: the cancelled run's successor is dropped, the other's runs without a
/// load.
#[test]
fn a_successor_held_back_by_a_backlog_does_not_run_once_its_run_is_cancelled() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::new("cancel_backlog");
    // Two gated nodes: `g` starts the cancelled chain, `block` holds the one worker thread.
    let mut registry = inc_registry();
    let (g_entered, g_release) = gated_node(&mut registry, "gate", json!(1));
    let (block_entered, block_release) = gated_node(&mut registry, "block", json!(1));
    let after_runs = counted_node(&mut registry, "after", json!(2));
    registry.register_fn("quick", |_| {
        Ok(flowcraft_rabbitmq::NodeResult::output(json!(3)))
    });
    let gated = bp(
        r#"{"id":"gated","nodes":[{"id":"g","uses":"gate"},{"id":"a","uses":"after"}],
        "edges":[{"source":"g","target":"a"}]}"#,
    );
    let free = bp(
        r#"{"id":"free","nodes":[{"id":"q","uses":"quick"},{"id":"a","uses":"after"}],
        "edges":[{"source":"q","target":"a"}]}"#,
    );
    let blocker = bp(r#"{"id":"blocker","nodes":[{"id":"b","uses":"block"}],"edges":[]}"#);
    let blueprints = vec![gated, free, blocker];
    let (worker, addr) = TestEnv::start_serving_metrics(
        env.worker(registry, blueprints.clone())
            .threads(1)
            .prefetch(8),
    );
    let client = env.client(blueprints);
    let cancelled = client.start_workflow("gated", ContextMap::new()).unwrap();
    g_entered.recv_timeout(WAIT).expect("the gate node started");
    // The free run's first job and the blocker's are queued, and delivered, before either
    // chain's successor.
    let going_on = client.start_workflow("free", ContextMap::new()).unwrap();
    client.start_workflow("blocker", ContextMap::new()).unwrap();
    env.eventually("the queued jobs are delivered", WAIT, || {
        env.queue_depth(&env.queue) == 0
    });
    g_release.send(()).unwrap();
    block_entered
        .recv_timeout(WAIT)
        .expect("the blocker holds the only thread");
    client.cancel(&cancelled).unwrap();
    // (Not a synchronisation: both successors' derived entries must be older than half a
    // second when their deliveries come, so that only the list of stopped runs decides.)
    std::thread::sleep(std::time::Duration::from_millis(800));
    block_release.send(()).unwrap();
    env.wait_for_status(&going_on, "completed", WAIT);
    env.eventually("five jobs are settled", WAIT, || {
        http_get(addr, "/metrics", &[])
            .1
            .contains("flowcraft_jobs_total{outcome=\"ack\"} 5")
    });
    let metrics = http_get(addr, "/metrics", &[]).1;
    for (outcome, count) in [("derived", 2), ("used", 1), ("unused", 1)] {
        let sample = format!("flowcraft_read_ahead_total{{outcome=\"{outcome}\"}} {count}\n");
        assert!(metrics.contains(&sample), "{sample} in {metrics}");
    }
    assert_eq!(after_runs.load(SeqCst), 1);
    assert!(!env.context(&cancelled).contains_key("_outputs.a"));
    assert_eq!(env.context(&going_on).get("_outputs.a"), Some(&json!(2)));
    worker.stop().unwrap();
}

/// A successor's state derived from its predecessor's commit (no load) holds the run's
/// status as that commit saw it: a run cancelled while its node ran stops at the next hop,
/// as it does when the successor loads.
#[test]
fn a_chain_cancelled_while_a_node_runs_stops_at_the_next_hop() {
    let env = TestEnv::new("cancel_hop");
    let mut registry = inc_registry();
    let (entered_rx, release_tx) = gated_node(&mut registry, "gate", json!(1));
    let after_runs = counted_node(&mut registry, "after", json!(2));
    let chain = bp(
        r#"{"id":"gated","nodes":[{"id":"g","uses":"gate"},{"id":"a","uses":"after"}],
        "edges":[{"source":"g","target":"a"}]}"#,
    );
    let (worker, addr) =
        TestEnv::start_serving_metrics(env.worker(registry, vec![chain.clone()]).threads(2));
    let client = env.client(vec![chain.clone()]);
    let run = client.start_workflow("gated", ContextMap::new()).unwrap();
    entered_rx
        .recv_timeout(WAIT)
        .expect("the gate node started");
    client.cancel(&run).unwrap();
    release_tx.send(()).unwrap();
    // The gate's delivery and its successor's are both settled.
    env.eventually("two jobs are settled", WAIT, || {
        http_get(addr, "/metrics", &[])
            .1
            .contains("flowcraft_jobs_total{outcome=\"ack\"} 2")
    });
    let context = env.context(&run);
    assert_eq!(context.get("_outputs.g"), Some(&json!(1)), "{context:?}");
    assert!(!context.contains_key("_outputs.a"), "{context:?}");
    assert_eq!(after_runs.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "cancelled"
    );
    worker.stop().unwrap();
}
