//! `flowcraft demo`: migrate, run a worker pool in this process, push a batch of runs of a
//! bundled fan-out/fan-in blueprint through it, and print a summary.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::services::postgres::migrate;
use crate::services::postgres::store::RunStore;
use crate::{Blueprint, NodeRegistry};
use clap::Args;
use serde_json::{json, Value};

use super::{fail, ServiceArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// The bundled blueprint.
const DEMO_BLUEPRINT: &str = include_str!("demo-fanout.json");

/// `flowcraft demo`.
#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    services: ServiceArgs,
    /// Runs to push through.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

pub fn demo(args: &DemoArgs) -> i32 {
    let s = &args.services;
    let bp = match Blueprint::from_json(DEMO_BLUEPRINT) {
        Ok(bp) => bp,
        Err(e) => return fail(EXIT_FAILED, format!("bundled blueprint: {e}")),
    };
    let jobs_per_run = bp.node_count();
    let (tables, pg, redis) = match s.connect_all(args.threads as u32 + 4) {
        Ok(services) => services,
        Err(code) => return code,
    };
    if let Err(e) = migrate::migrate(&pg, &tables) {
        return fail(EXIT_FAILED, format!("migration failed: {e}"));
    }
    // A queue of its own, so workers of other blueprints never see the demo's jobs.
    let queue = format!("{}.demo", s.queue);
    let worker = s
        .adapter(tables.clone(), pg.clone(), redis.clone())
        .queue(&queue)
        .registry(NodeRegistry::with_builtins())
        .blueprint(bp.clone())
        .threads(args.threads)
        .reconcile_every(None)
        .build()
        .and_then(|w| w.start());
    let worker = match worker {
        Ok(w) => w,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let client = match s.client_over(tables.clone(), pg.clone(), redis, &queue, [bp]) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "flowcraft demo: {} runs of 'demo-fanout' ({jobs_per_run} jobs each: 1 → 6 in parallel → 'all' join) on {} worker threads, queue '{queue}'",
        args.runs, args.threads
    );
    let started = Instant::now();
    let mut submitted: HashMap<String, Instant> = HashMap::with_capacity(args.runs);
    for i in 0..args.runs {
        let context = json!({"orderId": i})
            .as_object()
            .cloned()
            .unwrap_or_default();
        match client.start_workflow("demo-fanout", context) {
            Ok(run) => {
                submitted.insert(run, Instant::now());
            }
            Err(e) => {
                let _ = worker.stop();
                return fail(EXIT_FAILED, format!("cannot start run {i}: {e}"));
            }
        }
    }
    let store = match RunStore::new(pg.clone(), tables.clone()) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_FAILED, e),
    };
    let ids: Vec<String> = submitted.keys().cloned().collect();
    let mut finished: HashMap<String, (Instant, String)> = HashMap::new();
    let deadline = started + Duration::from_secs(120);
    let mut last_print = Instant::now();
    let query = format!(
        "SELECT run_id, status FROM {} WHERE run_id = ANY($1) AND status <> 'running'",
        tables.statuses
    );
    while finished.len() < ids.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let rows = match pg
            .get()
            .map_err(|e| e.to_string())
            .and_then(|mut c| c.query(&query, &[&ids]).map_err(|e| e.to_string()))
        {
            Ok(rows) => rows,
            Err(e) => {
                let _ = worker.stop();
                return fail(EXIT_FAILED, format!("cannot read statuses: {e}"));
            }
        };
        let now = Instant::now();
        for row in rows {
            let (run, status): (String, String) = (row.get(0), row.get(1));
            finished.entry(run).or_insert((now, status));
        }
        if last_print.elapsed() >= Duration::from_millis(250) || finished.len() == ids.len() {
            last_print = Instant::now();
            print!(
                "\r  {:>5}/{} runs finished  ({:.1} s)",
                finished.len(),
                ids.len(),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    let elapsed = started.elapsed();
    let _ = worker.stop();
    let completed = finished.values().filter(|(_, s)| s == "completed").count();
    let mut latencies: Vec<Duration> = finished
        .iter()
        .filter_map(|(run, (at, _))| submitted.get(run).map(|s| at.saturating_duration_since(*s)))
        .collect();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().saturating_sub(1)) as f64 * p).round() as usize)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0)
    };
    println!(
        "runs completed   {completed} of {} ({} failed or unfinished)",
        ids.len(),
        ids.len() - completed
    );
    println!("elapsed          {:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput       {:.0} jobs/s, {:.0} runs/s",
        (completed * jobs_per_run) as f64 / elapsed.as_secs_f64(),
        completed as f64 / elapsed.as_secs_f64()
    );
    println!("run latency      p50 {:.1} ms, p99 {:.1} ms (submit → completed, as seen by polling every 20 ms)", pct(0.5), pct(0.99));
    if let Some(run) = ids
        .iter()
        .find(|r| finished.get(*r).is_some_and(|(_, s)| s == "completed"))
    {
        if let Ok(Some(row)) = store.status(run) {
            let context = row
                .result
                .as_ref()
                .map(|r| r["context"].clone())
                .unwrap_or(Value::Null);
            println!("final context of run {run}:");
            println!(
                "{}",
                serde_json::to_string_pretty(&context).unwrap_or_default()
            );
        }
    }
    if completed == ids.len() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}
