//! `flowcraft runs`, `flowcraft inspect` and `flowcraft prune`: the runs and their history,
//! for people (see [`crate::services::postgres::history`]).

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::services::postgres::history::RunFilter;
use crate::vocabulary::keys::{AWAITING_DETAILS, AWAITING_NODE_IDS, BLUEPRINT_ID};
use crate::vocabulary::RunStatus;

use super::{fail, ServiceArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// Arguments of `flowcraft runs`.
#[derive(Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub services: ServiceArgs,
    /// Only runs with this status (running, awaiting, completed, failed, cancelled).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// Only runs of this blueprint.
    #[arg(long, value_name = "ID")]
    pub blueprint: Option<String>,
    /// At most this many runs, newest first.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub limit: i64,
}

/// Arguments of `flowcraft inspect`.
#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub services: ServiceArgs,
    /// The run.
    pub run_id: String,
}

/// Arguments of `flowcraft prune`.
#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub services: ServiceArgs,
    /// Remove runs that finished longer ago than this: a number and a unit, `s`, `m`, `h`
    /// or `d` (`7d`, `12h`).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Duration,
}

/// `7d`, `12h`, `30m`, `45s` as a duration.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not an age: use a number and s, m, h or d (7d, 12h)");
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// Runs `flowcraft runs`.
pub fn runs(args: &RunsArgs) -> i32 {
    let status = match args.status.as_deref().map(|s| (s, RunStatus::parse(s))) {
        None => None,
        Some((_, Some(status))) => Some(status),
        Some((s, None)) => {
            return fail(
                EXIT_USAGE,
                format!(
                    "unknown status '{s}': use one of {}",
                    RunStatus::ALL.map(RunStatus::as_str).join(", ")
                ),
            )
        }
    };
    let store = match args.services.run_store(1) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let filter = RunFilter {
        status,
        blueprint_id: args.blueprint.clone(),
        limit: args.limit,
    };
    let runs = match store.list_runs(&filter) {
        Ok(runs) => runs,
        Err(e) => return fail(EXIT_FAILED, e),
    };
    println!(
        "{:<38} {:<10} {:<20} {:<24} {:<24}",
        "RUN", "STATUS", "BLUEPRINT", "STARTED", "UPDATED"
    );
    for run in runs {
        println!(
            "{:<38} {:<10} {:<20} {:<24} {:<24}",
            run.run_id,
            run.status.as_str(),
            run.blueprint_id.as_deref().unwrap_or("-"),
            run.created_at.as_deref().unwrap_or("-"),
            run.updated_at.as_deref().unwrap_or("-"),
        );
    }
    EXIT_OK
}

/// Runs `flowcraft inspect`.
pub fn inspect(args: &InspectArgs) -> i32 {
    let store = match args.services.run_store(1) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let run = &args.run_id;
    let status = match store.status(run) {
        Ok(Some(row)) => row,
        Ok(None) => return fail(EXIT_FAILED, format!("no run with id '{run}'")),
        Err(e) => return fail(EXIT_FAILED, e),
    };
    let (history, context) = match (store.history(run), store.load(run)) {
        (Ok(history), Ok(snapshot)) => (history, snapshot.map(|s| s.context).unwrap_or_default()),
        (Err(e), _) | (_, Err(e)) => return fail(EXIT_FAILED, e),
    };
    println!("run        {run}");
    println!("status     {}", status.status.as_str());
    if let Some(blueprint) = context.get(BLUEPRINT_ID).and_then(Value::as_str) {
        println!("blueprint  {blueprint}");
    }
    println!("updated    {}", status.updated_at.as_deref().unwrap_or("-"));
    if let Some(reason) = status.reason() {
        println!("reason     {reason}");
    }
    println!();
    println!(
        "{:<24} {:>4} {:>7} {:<9} {:<24} {:>10}  {:<20} ERROR",
        "NODE", "ITER", "ATTEMPT", "OUTCOME", "STARTED", "MS", "WORKER"
    );
    for x in &history {
        println!(
            "{:<24} {:>4} {:>7} {:<9} {:<24} {:>10.1}  {:<20} {}",
            x.node_id,
            x.iteration,
            x.attempt,
            x.outcome,
            x.started_at,
            x.duration_ms,
            x.worker,
            x.error.as_deref().unwrap_or(""),
        );
    }
    let awaited: Vec<&str> = context
        .get(AWAITING_NODE_IDS)
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !awaited.is_empty() {
        println!();
        for node in awaited {
            let details = context
                .get(AWAITING_DETAILS)
                .and_then(|d| d.get(node))
                .cloned()
                .unwrap_or(Value::Null);
            println!("waits for  {node}: {details}");
        }
    }
    EXIT_OK
}

/// Runs `flowcraft prune`.
pub fn prune(args: &PruneArgs) -> i32 {
    let store = match args.services.run_store(1) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.prune(args.older_than) {
        Ok(pruned) => {
            println!(
                "removed {} finished runs and {} node executions",
                pruned.runs, pruned.executions
            );
            EXIT_OK
        }
        Err(e) => fail(EXIT_FAILED, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_have_a_unit() {
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in ["", "7", "d", "7w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
