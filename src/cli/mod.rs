//! Command-line interface. Every subcommand returns its exit code; errors are one clear line
//! on stderr, never a panic.

mod dashboard;
mod demo;
mod history;
mod local_cmds;
mod ops;
mod services;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code: the command worked (run completed or awaiting).
pub const EXIT_OK: i32 = 0;
/// Exit code: the run failed / the thing asked about does not exist.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage, invalid blueprint, unreachable service.
pub const EXIT_USAGE: i32 = 2;
/// Exit code of `start --wait`: the run did not finish in time.
pub const EXIT_TIMEOUT: i32 = 3;
/// Exit code of `start --wait`: the run is awaiting (a wait, sleep, webhook or subflow node).
pub const EXIT_AWAITING: i32 = 4;

#[derive(Parser)]
#[command(
    name = "flowcraft",
    version,
    about = "Run Flowcraft workflow blueprints in process, or across worker processes with RabbitMQ, PostgreSQL and Redis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--blueprints DIR`.
#[derive(Args, Clone)]
pub struct BlueprintDir {
    /// Directory of blueprint *.json files.
    #[arg(long, env = "FLOWCRAFT_BLUEPRINTS", value_name = "DIR")]
    pub blueprints: PathBuf,
}

/// Where the services are, and the names the runtime uses in them.
#[derive(Args, Clone)]
pub struct ServiceArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "RABBITMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    pub rabbitmq_url: String,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        value_name = "URL"
    )]
    pub postgres_url: String,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        value_name = "URL"
    )]
    pub redis_url: String,
    /// Job queue.
    #[arg(
        long,
        env = "FLOWCRAFT_QUEUE",
        default_value = crate::runtime::worker::DEFAULT_QUEUE,
        value_name = "NAME"
    )]
    pub queue: String,
    /// Table of run contexts.
    #[arg(
        long,
        env = "FLOWCRAFT_CONTEXTS_TABLE",
        default_value = crate::services::postgres::store::DEFAULT_CONTEXTS_TABLE,
        value_name = "NAME"
    )]
    pub contexts_table: String,
    /// Table of run statuses.
    #[arg(
        long,
        env = "FLOWCRAFT_STATUSES_TABLE",
        default_value = crate::services::postgres::store::DEFAULT_STATUSES_TABLE,
        value_name = "NAME"
    )]
    pub statuses_table: String,
    /// Table of webhook endpoints.
    #[arg(
        long,
        env = "FLOWCRAFT_WEBHOOKS_TABLE",
        default_value = crate::services::postgres::store::DEFAULT_WEBHOOKS_TABLE,
        value_name = "NAME"
    )]
    pub webhooks_table: String,
    /// Prefix of every Redis key.
    #[arg(
        long,
        env = "FLOWCRAFT_REDIS_PREFIX",
        default_value = crate::services::redis::DEFAULT_PREFIX,
        value_name = "PREFIX"
    )]
    pub redis_prefix: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a blueprint in this process and print the result as JSON.
    Run {
        #[command(flatten)]
        dir: BlueprintDir,
        /// Id of the blueprint to run.
        blueprint_id: String,
        /// Initial context (a JSON object).
        #[arg(long, value_name = "JSON")]
        context: Option<String>,
        /// Threads for independent nodes.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Validate every *.json blueprint in a directory and list the problems.
    Check {
        #[command(flatten)]
        dir: BlueprintDir,
    },
    /// Print a blueprint as a Mermaid flowchart.
    Graph {
        #[command(flatten)]
        dir: BlueprintDir,
        /// Id of the blueprint to draw.
        blueprint_id: String,
    },
    /// Create or update the PostgreSQL tables (idempotent; safe from several hosts at once).
    Migrate {
        #[command(flatten)]
        services: ServiceArgs,
    },
    /// Run a distributed worker until SIGINT/SIGTERM (a second signal exits at once).
    Worker(ops::WorkerArgs),
    /// Start a run; print its id (with --wait, its final status).
    Start {
        #[command(flatten)]
        dir: BlueprintDir,
        #[command(flatten)]
        services: ServiceArgs,
        /// Id of the blueprint to start.
        blueprint_id: String,
        /// Initial context (a JSON object).
        #[arg(long, value_name = "JSON")]
        context: Option<String>,
        /// The run's id (default: a new UUID). With it a start can be retried safely: a run
        /// that exists already is not started twice, its start jobs are only queued again.
        #[arg(long, value_name = "ID")]
        run_id: Option<String>,
        /// Wait until the run leaves `running`; exit 0 completed, 1 failed, 3 timed out, 4 awaiting.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 60.0, value_name = "SECS", requires = "wait")]
        timeout: f64,
    },
    /// Print a run's status as JSON; exit 1 if the run is unknown.
    Status {
        #[command(flatten)]
        services: ServiceArgs,
        run_id: String,
    },
    /// Resume an awaiting run along the edges of an action.
    Resume {
        #[command(flatten)]
        dir: BlueprintDir,
        #[command(flatten)]
        services: ServiceArgs,
        run_id: String,
        /// The action to follow.
        #[arg(long)]
        action: String,
        /// Output recorded for the awaited nodes (JSON).
        #[arg(long, value_name = "JSON")]
        output: Option<String>,
    },
    /// Cancel a running or awaiting run; its queued jobs are dropped.
    Cancel {
        #[command(flatten)]
        services: ServiceArgs,
        run_id: String,
    },
    /// One reconciler pass over stalled runs and lost wake-ups; prints its stats as JSON.
    Reconcile {
        #[command(flatten)]
        dir: BlueprintDir,
        #[command(flatten)]
        services: ServiceArgs,
        /// Runs idle longer than this are stalled.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        stalled_after: u64,
    },
    /// Migrate, run a worker pool in this process, push a batch of fan-out/fan-in runs through
    /// it and print a summary.
    Demo(demo::DemoArgs),
    /// List runs, newest first.
    Runs(history::RunsArgs),
    /// Print a run's nodes in the order they ran, with timings, attempts and errors, and
    /// what it waits for; exit 1 if the run is unknown.
    Inspect(history::InspectArgs),
    /// Remove finished runs (completed, failed, cancelled) and their history.
    Prune(history::PruneArgs),
    /// Serve the read-only dashboard (runs, a run's graph and timeline, dead letters).
    Dashboard(dashboard::DashboardArgs),
}

/// Parses the command line and runs the subcommand.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Run {
            dir,
            blueprint_id,
            context,
            threads,
        } => local_cmds::run(&dir, &blueprint_id, context.as_deref(), threads),
        Command::Check { dir } => local_cmds::check(&dir),
        Command::Graph { dir, blueprint_id } => local_cmds::graph(&dir, &blueprint_id),
        Command::Migrate { services } => ops::migrate(&services),
        Command::Worker(args) => ops::worker(&args),
        Command::Start {
            dir,
            services,
            blueprint_id,
            context,
            run_id,
            wait,
            timeout,
        } => ops::start(
            &dir,
            &services,
            &blueprint_id,
            context.as_deref(),
            run_id.as_deref(),
            wait.then_some(timeout),
        ),
        Command::Status { services, run_id } => ops::status(&services, &run_id),
        Command::Resume {
            dir,
            services,
            run_id,
            action,
            output,
        } => ops::resume(&dir, &services, &run_id, &action, output.as_deref()),
        Command::Cancel { services, run_id } => ops::cancel(&services, &run_id),
        Command::Reconcile {
            dir,
            services,
            stalled_after,
        } => ops::reconcile(&dir, &services, stalled_after),
        Command::Demo(args) => demo::demo(&args),
        Command::Runs(args) => history::runs(&args),
        Command::Inspect(args) => history::inspect(&args),
        Command::Prune(args) => history::prune(&args),
        Command::Dashboard(args) => dashboard::dashboard(&args),
    }
}

/// Prints an error line and returns the exit code.
pub fn fail(code: i32, message: impl std::fmt::Display) -> i32 {
    eprintln!("flowcraft: {message}");
    code
}

/// Parses `--context` as a JSON object.
pub fn parse_context(
    text: Option<&str>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let Some(text) = text else {
        return Ok(Default::default());
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err("--context must be a JSON object".to_string()),
        Err(e) => Err(format!("--context is not valid JSON: {e}")),
    }
}
