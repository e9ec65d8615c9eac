//! End-to-end throughput of the distributed worker against the real services, on the shared
//! workloads (`benches/workloads.json`: `chain5`, `diamond8`; every node is `inc`).
//!
//! For each worker thread count, N runs are created and their start jobs queued first; then a
//! worker starts and the clock runs until every run is `completed`. Printed: jobs/s, runs/s
//! (both over that whole time, the worker's start-up included), the *steady* jobs/s (from
//! the first node's start to the last one's) and the p50/p99 *job latency*: from the moment a node's predecessor started executing (or
//! the worker started, for start nodes) to the moment the node itself started — the cost of
//! one hop (commit, Redis, publish with confirm, delivery, dispatch).
//!
//! `cargo bench --bench distributed` (all), or with arguments:
//! `cargo bench --bench distributed -- --runs 500 --threads 1,2,4,8 --workload chain5`
//! (`--prefetch N` overrides the default of 8 × threads; `--inflight N` keeps at most N runs
//! in flight instead of queueing them all first, so the latency is a hop's, not the queue's;
//! `--no-history` runs the worker without the run history, to measure its cost). `--timers` measures instead how
//! late a 2 s `sleep` resumes its run after `wakeUpAt`. `--scale 1000,10000` measures how a
//! run's cost grows with its size instead: one batch of N `transform` workers and one chain
//! of N/10 `transform` nodes per size, 8 threads, with the cost per item and the run tables'
//! size on disk afterwards (`--workload batch` or `--workload chain` runs one of the two).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::{NodeRegistry, NodeResult};
use serde_json::json;

struct Args {
    runs: usize,
    prefetch: Option<u16>,
    inflight: Option<usize>,
    threads: Vec<usize>,
    workloads: Vec<String>,
    /// Whether the worker records the run history (`--no-history` turns it off).
    history: bool,
}

fn args() -> Args {
    let mut a = Args {
        runs: 500,
        prefetch: None,
        inflight: None,
        threads: vec![1, 2, 4, 8, 16],
        workloads: vec!["chain5".into(), "diamond8".into()],
        history: true,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--runs" => a.runs = value.parse().expect("--runs N"),
            "--threads" => {
                a.threads = value
                    .split(',')
                    .map(|t| t.parse().expect("--threads 1,2,4"))
                    .collect()
            }
            "--workload" => a.workloads = vec![value],
            "--prefetch" => a.prefetch = Some(value.parse().expect("--prefetch N")),
            "--inflight" => a.inflight = Some(value.parse().expect("--inflight N")),
            "--no-history" => {
                a.history = false;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

type Starts = Arc<Mutex<HashMap<(String, String), Instant>>>;

fn timed_registry(starts: Starts) -> NodeRegistry {
    let mut r = NodeRegistry::with_builtins();
    r.register_fn("inc", move |ctx| {
        starts
            .lock()
            .unwrap()
            .insert((ctx.run_id.clone(), ctx.node_id.clone()), Instant::now());
        Ok(NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) + 1
        )))
    });
    r
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench(
    workload: &str,
    runs: usize,
    threads: usize,
    prefetch: Option<u16>,
    inflight: Option<usize>,
    history: bool,
) {
    let env = TestEnv::new(&format!("bench_{workload}_{threads}"));
    let (blueprint, _) = common::workload(workload);
    let jobs_per_run = blueprint.node_count();
    let client = env.client(vec![blueprint.clone()]);
    // Backlog mode: every run is queued before the worker starts. Paced mode (--inflight N):
    // at most N runs are in flight; a new one starts as one completes.
    let mut submitted: Vec<(String, Option<Instant>)> = Vec::with_capacity(runs);
    if inflight.is_none() {
        for _ in 0..runs {
            submitted.push((
                client.start_workflow(workload, ContextMap::new()).unwrap(),
                None,
            ));
        }
    }
    let starts: Starts = Arc::new(Mutex::new(HashMap::new()));
    let clock = Instant::now();
    let mut builder = env
        .worker(timed_registry(starts.clone()), vec![blueprint.clone()])
        .threads(threads)
        .record_history(history);
    if let Some(p) = prefetch {
        builder = builder.prefetch(p);
    }
    let worker = builder.build().unwrap().start().unwrap();
    let table = env.tables.statuses.clone();
    let mut pg = env.pg.get().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 = pg
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE status = 'completed'"),
                &[],
            )
            .unwrap()
            .get(0);
        let done = done as usize;
        if done == runs {
            break;
        }
        if let Some(limit) = inflight {
            while submitted.len() < runs && submitted.len() - done < limit {
                let at = Instant::now();
                submitted.push((
                    client.start_workflow(workload, ContextMap::new()).unwrap(),
                    Some(at),
                ));
            }
        }
        assert!(Instant::now() < deadline, "runs did not complete");
        std::thread::sleep(Duration::from_millis(if inflight.is_some() {
            2
        } else {
            25
        }));
    }
    let elapsed = clock.elapsed();
    drop(pg);
    worker.stop().unwrap();
    let starts = starts.lock().unwrap();
    let mut latencies = Vec::with_capacity(runs * jobs_per_run);
    for (run, submitted_at) in &submitted {
        for node in 0..blueprint.node_count() {
            let id = &blueprint.node(node).id;
            let Some(&at) = starts.get(&(run.clone(), id.clone())) else {
                continue;
            };
            let ready_at = blueprint
                .forward_predecessors(node)
                .iter()
                .filter_map(|&p| {
                    starts
                        .get(&(run.clone(), blueprint.node(p).id.clone()))
                        .copied()
                })
                .max()
                .unwrap_or(submitted_at.unwrap_or(clock));
            latencies.push(at.saturating_duration_since(ready_at));
        }
    }
    latencies.sort();
    let jobs = runs * jobs_per_run;
    // Steady rate: from the first node's start to the last one's, without the worker's
    // start-up (connections, channels) or the completion poll.
    let (first, last) = (starts.values().min(), starts.values().max());
    let steady = match (first, last) {
        (Some(first), Some(last)) if last > first => {
            (starts.len() - 1) as f64 / last.duration_since(*first).as_secs_f64()
        }
        _ => 0.0,
    };
    let mode = inflight
        .map(|n| format!("inflight={n}"))
        .unwrap_or_else(|| "backlog".into());
    println!(
        "{workload:<9} threads={threads:<3} runs={runs:<5} {mode:<11} {:>8.0} jobs/s {:>7.0} runs/s   job latency p50 {:>7.2} ms  p99 {:>7.2} ms   ({:.2} s; steady {:.0} jobs/s)",
        jobs as f64 / elapsed.as_secs_f64(),
        runs as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        elapsed.as_secs_f64(),
        steady,
    );
}

/// Timer accuracy: runs of `mark → sleep 2s → stamp`; lateness = stamp − (mark + 2 s).
fn timers(runs: usize) {
    let mut env = TestEnv::new("bench_timers");
    env.extra_queues.push(format!("{}.delay.2000", env.queue));
    let marks: Arc<Mutex<HashMap<(String, String), u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = NodeRegistry::with_builtins();
    let seen = marks.clone();
    registry.register_fn("mark", move |ctx| {
        seen.lock().unwrap().insert(
            (ctx.run_id.clone(), ctx.node_id.clone()),
            flowcraft_rabbitmq::testing::nodes::now_ms(),
        );
        Ok(NodeResult::output(json!(null)))
    });
    let bp = bp(
        r#"{"id":"timer","nodes":[{"id":"before","uses":"mark"},{"id":"nap","uses":"sleep","params":{"duration":2000}},
            {"id":"after","uses":"mark"}],"edges":[{"source":"before","target":"nap"},{"source":"nap","target":"after"}]}"#,
    );
    let worker = env.start_worker(registry, vec![bp.clone()], 4);
    let client = env.client(vec![bp]);
    let ids: Vec<String> = (0..runs)
        .map(|_| client.start_workflow("timer", ContextMap::new()).unwrap())
        .collect();
    for id in &ids {
        env.wait_for_status(id, "completed", Duration::from_secs(60));
    }
    worker.stop().unwrap();
    let marks = marks.lock().unwrap();
    let mut late: Vec<u64> = ids
        .iter()
        .filter_map(|id| {
            let before = marks.get(&(id.clone(), "before".into()))?;
            let after = marks.get(&(id.clone(), "after".into()))?;
            Some(after.saturating_sub(before + 2000))
        })
        .collect();
    late.sort();
    println!(
        "timers    runs={runs:<5} sleep 2 s: lateness after wakeUpAt p50 {} ms, p99 {} ms, max {} ms",
        late[late.len() / 2],
        late[(late.len() * 99 / 100).min(late.len() - 1)],
        late[late.len() - 1]
    );
    drop(env);
}

/// One run of `bp` from `context` on a fresh worker with 8 threads: its wall time, the run
/// tables' size on disk afterwards (with their indexes and TOAST), and the size of the data
/// they hold (the sum of their rows' stored sizes, `pg_column_size` of each row).
fn one_run(
    name: &str,
    bp: &flowcraft_rabbitmq::Blueprint,
    context: ContextMap,
) -> (Duration, i64, i64) {
    let env = TestEnv::new(name);
    let worker = env.start_worker(NodeRegistry::with_builtins(), vec![bp.clone()], 8);
    let started = Instant::now();
    let run = env.start_run(bp, context);
    env.wait_for_status(&run, "completed", Duration::from_secs(3600));
    let took = started.elapsed();
    worker.stop().unwrap();
    let bytes: i64 = env
        .pg
        .get()
        .unwrap()
        .query_one(
            "SELECT pg_total_relation_size($1::text::regclass) + pg_total_relation_size($2::text::regclass)
                    + pg_total_relation_size($3::text::regclass)",
            &[&env.tables.contexts, &env.tables.statuses, &env.tables.entries()],
        )
        .unwrap()
        .get(0);
    let data: i64 = env
        .pg
        .get()
        .unwrap()
        .query_one(
            &format!(
                "SELECT (SELECT COALESCE(sum(pg_column_size(t.*)), 0) FROM {e} t)::bigint
                      + (SELECT COALESCE(sum(pg_column_size(t.*)), 0) FROM {c} t)::bigint
                      + (SELECT COALESCE(sum(pg_column_size(t.*)), 0) FROM {s} t)::bigint",
                e = env.tables.entries(),
                c = env.tables.contexts,
                s = env.tables.statuses
            ),
            &[],
        )
        .unwrap()
        .get(0);
    (took, bytes, data)
}

/// How a run's cost grows with its size: a batch of N `transform` workers and a chain of
/// N/10 `transform` nodes, per size.
fn scale(sizes: &[usize], shapes: &[String]) {
    let wanted = |shape: &str| shapes.is_empty() || shapes.iter().any(|s| s == shape);
    for &n in sizes {
        if wanted("batch") {
            let batch = bp(&json!({"id": "sbatch", "nodes": [
            {"id": "items", "uses": "transform", "params": {"expression": "context.items"}},
            {"id": "scatter", "uses": "batch-scatter", "params": {"workerUsesKey": "transform",
                "workerParams": {"expression": "input * 2"}, "gatherNodeId": "gather"}},
            {"id": "gather", "uses": "batch-gather"}],
          "edges": [{"source": "items", "target": "scatter"}, {"source": "scatter", "target": "gather"}]})
        .to_string());
            let mut context = ContextMap::new();
            context.insert("items".into(), json!((0..n).collect::<Vec<_>>()));
            let (took, bytes, data) = one_run("bench_scale_batch", &batch, context);
            println!(
            "batch     items={n:<7} {:>8.2} s   {:>8.3} ms/item   tables {:>8.1} MB   data {:>8.1} MB",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / n as f64,
            bytes as f64 / 1e6,
            data as f64 / 1e6
        );
        }
        if !wanted("chain") {
            continue;
        }
        let m = (n / 10).max(2);
        let nodes: Vec<serde_json::Value> = (0..m)
            .map(|i| json!({"id": format!("n{i}"), "uses": "transform", "params": {"expression": "(input ?? 0) + 1"}}))
            .collect();
        let edges: Vec<serde_json::Value> = (1..m)
            .map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")}))
            .collect();
        let chain = bp(&json!({"id": "schain", "nodes": nodes, "edges": edges}).to_string());
        let (took, bytes, data) = one_run("bench_scale_chain", &chain, ContextMap::new());
        println!(
            "chain     nodes={m:<7} {:>8.2} s   {:>8.3} ms/node   tables {:>8.1} MB   data {:>8.1} MB",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / m as f64,
            bytes as f64 / 1e6,
            data as f64 / 1e6
        );
    }
}

fn main() {
    // The worker's warnings (retries, reconnections) show with RUST_LOG=warn.
    let _ = env_logger::try_init();
    let a = args();
    if std::env::args().any(|x| x == "--list") {
        return;
    }
    if std::env::args().any(|x| x == "--timers") {
        timers(a.runs.min(200));
        return;
    }
    let argv: Vec<String> = std::env::args().collect();
    if let Some(sizes) = argv.iter().position(|x| x == "--scale").map(|i| {
        argv.get(i + 1)
            .map(|s| {
                s.split(',')
                    .map(|n| n.parse().expect("--scale 1000,10000"))
                    .collect()
            })
            .unwrap_or_else(|| vec![1_000, 10_000])
    }) {
        // `--workload batch` or `--workload chain` measures one shape only.
        let shapes: Vec<String> = a
            .workloads
            .iter()
            .filter(|w| *w == "batch" || *w == "chain")
            .cloned()
            .collect();
        scale(&sizes, &shapes);
        return;
    }
    for w in &a.workloads {
        for &t in &a.threads {
            bench(w, a.runs, t, a.prefetch, a.inflight, a.history);
        }
    }
}
