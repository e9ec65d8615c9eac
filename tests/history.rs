//! Run history: every node execution leaves a row written with its commit (or alone, for an
//! attempt that failed), and `flowcraft runs`, `inspect` and `prune` read it.

mod common;

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use serde_json::json;

fn flowcraft(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env
        .flowcraft_command()
        .args(args)
        .output()
        .expect("run flowcraft");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_execution_is_recorded_and_the_cli_reads_the_history() {
    let env = TestEnv::new("history");
    let registry = flaky_registry("first attempt fails", "the disk <is> full");
    let (chain, _) = workload("chain5");
    let retrying = bp(&json!({"id": "retrying", "nodes": [
        {"id": "a", "uses": "inc"},
        {"id": "b", "uses": "flaky", "config": {"maxRetries": 2}},
        {"id": "c", "uses": "broken"}],
      "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]})
    .to_string());
    let worker = env.start_worker(registry, vec![chain.clone(), retrying.clone()], 2);

    let done = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&done, "completed", WAIT);
    let history = env.store().history(&done).unwrap();
    let nodes: Vec<(&str, &str, u32)> = history
        .iter()
        .map(|x| (x.node_id.as_str(), x.outcome.as_str(), x.attempt))
        .collect();
    let chain_nodes: Vec<String> = (0..chain.node_count())
        .map(|i| chain.node(i).id.clone())
        .collect();
    assert_eq!(nodes.len(), chain_nodes.len(), "{history:?}");
    for ((node, outcome, attempt), expected) in nodes.iter().zip(&chain_nodes) {
        assert_eq!(
            (*node, *outcome, *attempt),
            (expected.as_str(), "completed", 1)
        );
    }
    assert!(history
        .iter()
        .all(|x| x.worker.contains(':') && x.duration_ms >= 0.0));

    let failed = env.start_run(&retrying, ContextMap::new());
    env.wait_for_status(&failed, "failed", WAIT);
    worker.stop().unwrap();
    let history = env.store().history(&failed).unwrap();
    let rows: Vec<(&str, &str, u32, Option<&str>)> = history
        .iter()
        .map(|x| {
            (
                x.node_id.as_str(),
                x.outcome.as_str(),
                x.attempt,
                x.error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("a", "completed", 1, None),
            ("b", "retried", 1, Some("first attempt fails")),
            ("b", "completed", 2, None),
            ("c", "failed", 1, Some("the disk <is> full")),
        ]
    );

    // The command line.
    let (code, out) = flowcraft(&env, &["inspect", &failed]);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "status     failed",
        "retried",
        "first attempt fails",
        "the disk <is> full",
    ] {
        assert!(out.contains(expected), "inspect lacks '{expected}':\n{out}");
    }
    let (code, out) = flowcraft(&env, &["runs", "--status", "failed"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&failed) && !out.contains(&done), "{out}");
    let (code, out) = flowcraft(&env, &["runs", "--blueprint", "chain5", "--limit", "5"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&done) && !out.contains(&failed), "{out}");
    let (code, out) = flowcraft(&env, &["runs", "--status", "lost"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = flowcraft(&env, &["inspect", "no-such-run"]);
    assert_eq!(code, 1, "{out}");

    // Pruning: nothing is old enough after a day; everything finished is after 0 s.
    let (code, out) = flowcraft(&env, &["prune", "--older-than", "1d"]);
    assert_eq!(
        (code, out.trim()),
        (0, "removed 0 finished runs and 0 node executions")
    );
    let (code, out) = flowcraft(&env, &["prune", "--older-than", "0s"]);
    assert_eq!(
        (code, out.trim()),
        (0, "removed 2 finished runs and 9 node executions")
    );
    assert_eq!(env.count_rows(&env.tables.statuses), 0);
    assert_eq!(env.count_rows(&env.tables.contexts), 0);
    assert_eq!(env.count_rows(&env.tables.entries()), 0);
    assert_eq!(env.count_rows(&env.tables.history()), 0);
    let (code, out) = flowcraft(&env, &["prune", "--older-than", "a week"]);
    assert_eq!(code, 2, "{out}");
}
