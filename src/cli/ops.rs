//! The distributed subcommands: `migrate`, `worker`, `start`, `status`, `resume`, `cancel`,
//! `reconcile`.

use std::time::Duration;

use crate::runtime::webhook::{WebhookOptions, WebhookServer};
use crate::services::postgres::migrate as migrations;
use crate::services::postgres::store::StatusRow;
use crate::{NodeRegistry, RunStatus};
use clap::Args;
use serde_json::{json, Value};

use super::local_cmds::{load_valid, run_inputs};
use super::{
    fail, BlueprintDir, ServiceArgs, EXIT_AWAITING, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE,
};

/// `flowcraft worker`.
#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    dir: BlueprintDir,
    #[command(flatten)]
    services: ServiceArgs,
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Unacked deliveries in flight (default: 8 × threads).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Seconds between reconciler passes (0: no reconciler in this worker).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    reconcile_every: u64,
    /// Runs idle longer than this are resumed by the reconciler.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    stalled_after: u64,
    /// How often one node may execute in one run (loops).
    #[arg(long, default_value_t = crate::engine::local::DEFAULT_MAX_ITERATIONS)]
    max_iterations: u32,
    /// Serve webhook calls (POST /webhooks/<runId>/<nodeId>) on this address, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    webhook_listen: Option<String>,
    /// Serve GET /metrics (Prometheus), /healthz and /readyz on this address, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Do not record node executions in the run history (`flowcraft inspect` then shows none).
    #[arg(long)]
    no_history: bool,
    /// Base URL of webhook endpoints as callers reach them.
    #[arg(
        long,
        env = "FLOWCRAFT_PUBLIC_URL",
        default_value = crate::runtime::worker::DEFAULT_PUBLIC_URL,
        value_name = "URL"
    )]
    public_url: String,
    /// Shared secret: webhook calls must carry X-Flowcraft-Signature: sha256=<HMAC-SHA256 of the body>.
    #[arg(
        long,
        env = "FLOWCRAFT_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    webhook_secret: Option<String>,
    /// Largest accepted webhook body, in bytes.
    #[arg(long, default_value_t = crate::runtime::webhook::DEFAULT_MAX_BODY, value_name = "BYTES")]
    webhook_max_body: usize,
    /// Fanout exchange of webhook events.
    #[arg(
        long,
        env = "FLOWCRAFT_EVENTS_EXCHANGE",
        default_value = crate::runtime::worker::DEFAULT_EVENTS_EXCHANGE,
        value_name = "NAME"
    )]
    events_exchange: String,
}

pub fn migrate(services: &ServiceArgs) -> i32 {
    let tables = match services.tables() {
        Ok(t) => t,
        Err(code) => return code,
    };
    let pg = match services.postgres(1) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match migrations::migrate(&pg, &tables) {
        Ok(applied) if applied.is_empty() => {
            println!("database is up to date");
            EXIT_OK
        }
        Ok(applied) => {
            println!("applied {}", applied.join(", "));
            EXIT_OK
        }
        Err(e) => fail(EXIT_FAILED, format!("migration failed: {e}")),
    }
}

pub fn worker(args: &WorkerArgs) -> i32 {
    let blueprints = match load_valid(&args.dir) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if blueprints.is_empty() {
        return fail(
            EXIT_USAGE,
            format!("no blueprints in {}", args.dir.blueprints.display()),
        );
    }
    let s = &args.services;
    let (tables, pg, redis) = match s.connect_all(args.threads as u32 + 2) {
        Ok(services) => services,
        Err(code) => return code,
    };
    let webhooks = match &args.webhook_listen {
        None => None,
        Some(addr) => {
            let store =
                match crate::services::postgres::store::RunStore::new(pg.clone(), tables.clone()) {
                    Ok(store) => store,
                    Err(e) => return fail(EXIT_USAGE, e),
                };
            let options = WebhookOptions {
                store,
                coord: crate::RedisCoordinationStore::new(redis.clone(), s.redis_prefix.clone()),
                amqp_url: s.rabbitmq_url.clone(),
                exchange: args.events_exchange.clone(),
                secret: args.webhook_secret.clone(),
                max_body: args.webhook_max_body,
            };
            match WebhookServer::start(addr, options) {
                Ok(server) => {
                    eprintln!("flowcraft: webhooks on http://{}", server.local_addr());
                    Some(server)
                }
                Err(e) => return fail(EXIT_USAGE, e),
            }
        }
    };
    let signal_rx = match stop_signals() {
        Ok(rx) => rx,
        Err(code) => return code,
    };
    let ids: Vec<String> = blueprints.keys().cloned().collect();
    let mut builder = s
        .adapter(tables, pg, redis)
        .registry(NodeRegistry::with_builtins())
        .blueprints(blueprints.into_values())
        .threads(args.threads)
        .reconcile_every(
            (args.reconcile_every > 0).then(|| Duration::from_secs(args.reconcile_every)),
        )
        .stalled_after(Duration::from_secs(args.stalled_after))
        .max_iterations(args.max_iterations)
        .public_url(&args.public_url)
        .events_exchange(&args.events_exchange)
        .connection_name(format!("flowcraft worker pid {}", std::process::id()));
    if let Some(p) = args.prefetch {
        builder = builder.prefetch(p);
    }
    builder = builder.record_history(!args.no_history);
    if let Some(addr) = &args.metrics_listen {
        builder = builder.metrics_listen(addr);
    }
    let handle = match builder.build().and_then(|w| w.start()) {
        Ok(h) => h,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    log::info!(
        "worker started: queue '{}', {} threads, blueprints {ids:?}",
        s.queue,
        args.threads
    );
    eprintln!(
        "flowcraft: worker consuming '{}' with {} threads (Ctrl-C to stop)",
        s.queue, args.threads
    );
    if let Some(addr) = handle.metrics_addr() {
        eprintln!("flowcraft: metrics and health on http://{addr} (/metrics, /healthz, /readyz)");
    }
    let _ = signal_rx.recv();
    eprintln!("flowcraft: stopping: finishing the jobs in flight (a second signal exits at once)");
    handle.shutdown();
    if let Some(server) = webhooks {
        server.stop();
    }
    match handle.join() {
        Ok(()) => {
            eprintln!("flowcraft: worker stopped");
            EXIT_OK
        }
        Err(e) => fail(EXIT_FAILED, format!("worker ended with an error: {e}")),
    }
}

/// SIGINT/SIGTERM as a channel: the first signal sends; a second exits at once with 130.
pub fn stop_signals() -> Result<crossbeam_channel::Receiver<()>, i32> {
    let (signal_tx, signal_rx) = crossbeam_channel::unbounded::<()>();
    let mut signals = 0u32;
    let handler = ctrlc::set_handler(move || {
        signals += 1;
        if signals > 1 {
            eprintln!("flowcraft: second signal; exiting now");
            std::process::exit(130);
        }
        let _ = signal_tx.send(());
    });
    match handler {
        Ok(()) => Ok(signal_rx),
        Err(e) => Err(fail(
            EXIT_FAILED,
            format!("cannot install the signal handler: {e}"),
        )),
    }
}

/// `{"runId","status","updatedAt","result"}`.
pub fn status_json(row: &StatusRow) -> Value {
    json!({"runId": row.run_id, "status": row.status, "updatedAt": row.updated_at, "result": row.result})
}

pub fn start(
    dir: &BlueprintDir,
    services: &ServiceArgs,
    id: &str,
    context: Option<&str>,
    run_id: Option<&str>,
    wait: Option<f64>,
) -> i32 {
    let (initial, blueprints, _) = match run_inputs(dir, id, context) {
        Ok(inputs) => inputs,
        Err(code) => return code,
    };
    let client = match services.client(blueprints) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let started = match run_id {
        Some(run) => client
            .start_workflow_with_id(id, run, initial)
            .map(|()| run.to_string()),
        None => client.start_workflow(id, initial),
    };
    let run = match started {
        Ok(run) => run,
        Err(e) if e.is_refusal() => return fail(EXIT_USAGE, format!("cannot start the run: {e}")),
        Err(e) => return fail(EXIT_FAILED, format!("cannot start the run: {e}")),
    };
    let Some(timeout) = wait else {
        println!("{run}");
        return EXIT_OK;
    };
    eprintln!("flowcraft: started run {run}; waiting");
    let row = match client.wait(&run, Duration::from_secs_f64(timeout.max(0.0))) {
        Ok(row) => row,
        Err(e) => return fail(EXIT_FAILED, e),
    };
    println!("{}", status_json(&row));
    match row.status {
        RunStatus::Completed => EXIT_OK,
        RunStatus::Awaiting => EXIT_AWAITING,
        RunStatus::Running => {
            eprintln!("flowcraft: run {run} is still running after {timeout} s");
            EXIT_TIMEOUT
        }
        RunStatus::Failed | RunStatus::Cancelled => EXIT_FAILED,
    }
}

pub fn status(services: &ServiceArgs, run: &str) -> i32 {
    let store = match services.run_store(1) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.status(run) {
        Ok(Some(row)) => {
            println!("{}", status_json(&row));
            EXIT_OK
        }
        Ok(None) => fail(EXIT_FAILED, format!("no run with id '{run}'")),
        Err(e) => fail(EXIT_FAILED, e),
    }
}

pub fn resume(
    dir: &BlueprintDir,
    services: &ServiceArgs,
    run: &str,
    action: &str,
    output: Option<&str>,
) -> i32 {
    let output: Value = match output {
        None => Value::Null,
        Some(text) => match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return fail(EXIT_USAGE, format!("--output is not valid JSON: {e}")),
        },
    };
    let blueprints = match load_valid(dir) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let client = match services.client(blueprints) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.resume_with_action(run, Some(action), output) {
        Ok(nodes) => {
            println!(
                "{}",
                json!({"runId": run, "resumed": nodes, "action": action})
            );
            EXIT_OK
        }
        Err(e @ crate::Error::Unstorable { .. }) => fail(EXIT_USAGE, e),
        Err(e) => fail(EXIT_FAILED, e),
    }
}

pub fn cancel(services: &ServiceArgs, run: &str) -> i32 {
    let client = match services.client(Default::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.cancel(run) {
        Ok(()) => {
            println!("{}", json!({"runId": run, "status": "cancelled"}));
            EXIT_OK
        }
        Err(e) => fail(EXIT_FAILED, e),
    }
}

pub fn reconcile(dir: &BlueprintDir, services: &ServiceArgs, stalled_after: u64) -> i32 {
    let blueprints = match load_valid(dir) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let (tables, pg, redis) = match services.connect_all(2) {
        Ok(services) => services,
        Err(code) => return code,
    };
    let adapter = services
        .adapter(tables, pg, redis)
        .blueprints(blueprints.into_values())
        .stalled_after(Duration::from_secs(stalled_after))
        .build();
    let adapter = match adapter {
        Ok(a) => a,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    match adapter.reconciler().run() {
        Ok(stats) => {
            println!("{}", serde_json::to_string(&stats).unwrap_or_default());
            EXIT_OK
        }
        Err(e) => fail(EXIT_FAILED, format!("reconciliation failed: {e}")),
    }
}
