//! Command-line interface. Every subcommand returns its exit code; errors are one clear line
//! on stderr, never a panic.

mod local_cmds;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code: the command worked (run completed or awaiting).
pub const EXIT_OK: i32 = 0;
/// Exit code: the run failed / the thing asked about does not exist.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage, invalid blueprint, unreachable service.
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser)]
#[command(
    name = "flowcraft",
    version,
    about = "Run Flowcraft workflow blueprints in process or across workers (RabbitMQ + PostgreSQL + Redis)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct BlueprintDir {
    /// Directory of blueprint *.json files.
    #[arg(long, env = "FLOWCRAFT_BLUEPRINTS", value_name = "DIR")]
    pub blueprints: PathBuf,
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
