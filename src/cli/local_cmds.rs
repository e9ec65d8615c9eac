//! `run`, `check` and `graph`: the in-process subcommands.

use std::collections::BTreeMap;

use crate::engine::blueprint::{self, Blueprint};
use crate::engine::lint::{lint, Severity};
use crate::vocabulary::limits::cut_reason;
use crate::{LocalRuntime, NodeRegistry, RunStatus};

use super::{fail, parse_context, BlueprintDir, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// Loads a blueprint directory, refusing it (with every problem listed) if any file is invalid.
pub fn load_valid(dir: &BlueprintDir) -> Result<BTreeMap<String, Blueprint>, i32> {
    let (found, problems) = blueprint::load_dir(&dir.blueprints);
    if problems.is_empty() {
        return Ok(found);
    }
    for p in &problems {
        eprintln!("flowcraft: {p}");
    }
    Err(EXIT_USAGE)
}

/// Loads a valid blueprint directory that has blueprint `id`: every blueprint, and that one.
pub fn load_with(
    dir: &BlueprintDir,
    id: &str,
) -> Result<(BTreeMap<String, Blueprint>, Blueprint), i32> {
    let blueprints = load_valid(dir)?;
    match blueprints.get(id).cloned() {
        Some(bp) => Ok((blueprints, bp)),
        None => Err(fail(
            EXIT_USAGE,
            format!(
                "no blueprint with id '{id}' in {}",
                dir.blueprints.display()
            ),
        )),
    }
}

/// What `run` and `start` need: the initial context, a directory with blueprint `id`, and
/// that blueprint.
pub type RunInputs = (
    serde_json::Map<String, serde_json::Value>,
    BTreeMap<String, Blueprint>,
    Blueprint,
);

/// Parses `--context` and loads a directory that has blueprint `id`.
pub fn run_inputs(dir: &BlueprintDir, id: &str, context: Option<&str>) -> Result<RunInputs, i32> {
    let initial = parse_context(context).map_err(|e| fail(EXIT_USAGE, e))?;
    let (blueprints, bp) = load_with(dir, id)?;
    Ok((initial, blueprints, bp))
}

pub fn run(dir: &BlueprintDir, id: &str, context: Option<&str>, threads: usize) -> i32 {
    let (initial, blueprints, bp) = match run_inputs(dir, id, context) {
        Ok(inputs) => inputs,
        Err(code) => return code,
    };
    let runtime = LocalRuntime::builder(NodeRegistry::with_builtins())
        .blueprints(blueprints.into_values())
        .threads(threads)
        .build();
    let result = runtime.run(&bp, initial);
    match serde_json::to_string(&result) {
        Ok(text) => println!("{text}"),
        Err(e) => return fail(EXIT_FAILED, format!("cannot print the result: {e}")),
    }
    match result.status {
        RunStatus::Completed | RunStatus::Awaiting => EXIT_OK,
        _ => EXIT_FAILED,
    }
}

pub fn check(dir: &BlueprintDir) -> i32 {
    let (found, mut problems) = blueprint::load_dir(&dir.blueprints);
    let mut warnings = Vec::new();
    let registry = NodeRegistry::with_builtins();
    for bp in found.values() {
        for finding in lint(bp, &registry, &|id| found.contains_key(id)) {
            let line = format!(
                "blueprint '{}': {}",
                bp.id(),
                cut_reason(&finding.to_string())
            );
            match finding.severity {
                Severity::Error => problems.push(line),
                Severity::Warning => warnings.push(line),
            }
        }
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    for p in &problems {
        println!("error: {p}");
    }
    println!(
        "{} blueprint(s) valid, {} problem(s), {} warning(s)",
        found.len(),
        problems.len(),
        warnings.len()
    );
    if problems.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

pub fn graph(dir: &BlueprintDir, id: &str) -> i32 {
    match load_with(dir, id) {
        Ok((_, bp)) => {
            print!("{}", bp.to_mermaid());
            EXIT_OK
        }
        Err(code) => code,
    }
}
