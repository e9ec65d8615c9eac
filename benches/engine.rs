//! Engine micro-benchmarks (no services): condition evaluation, successor choice, and the
//! in-process runner's overhead per node. Run with `cargo bench --bench engine`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use flowcraft_rabbitmq::blueprint::Blueprint;
use flowcraft_rabbitmq::expr::Expression;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::testing::flow::{choose_successors, ConditionScope};
use flowcraft_rabbitmq::{LocalRuntime, NodeRegistry, NodeResult};
use serde_json::{json, Value};

/// Runs `f` repeatedly for about `budget` and returns the mean time per call.
fn measure(budget: Duration, mut f: impl FnMut()) -> Duration {
    for _ in 0..100 {
        f();
    }
    let mut calls = 0u64;
    let start = Instant::now();
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        calls += 100;
    }
    start.elapsed() / calls as u32
}

fn report(name: &str, per_call: Duration, budget_us: f64) {
    let us = per_call.as_secs_f64() * 1e6;
    let verdict = if us <= budget_us { "within" } else { "OVER" };
    println!("{name:<48} {us:>9.3} µs   (budget {budget_us} µs: {verdict})");
}

fn main() {
    let budget = Duration::from_millis(if std::env::args().any(|a| a == "--quick") {
        100
    } else {
        1500
    });

    // 1. A typical condition over a realistic context.
    let mut context = ContextMap::new();
    for i in 0..20 {
        context.insert(
            format!("_outputs.n{i}"),
            json!({"total": i * 10, "ok": true}),
        );
    }
    context.insert("mode".into(), json!("fast"));
    let result = json!({"output": {"total": 150, "items": [1, 2, 3]}, "action": null});
    let condition = Expression::parse("result.output.total > 100 && mode == 'fast'").unwrap();
    let scope = ConditionScope {
        context: &context,
        result: &result,
    };
    report(
        "evaluate condition (compiled)",
        measure(budget, || {
            black_box(condition.evaluate_bool(black_box(&scope)));
        }),
        2.0,
    );
    let per_call = measure(budget, || {
        let e =
            Expression::parse(black_box("result.output.total > 100 && mode == 'fast'")).unwrap();
        black_box(e.evaluate_bool(&scope));
    });
    println!(
        "{:<48} {:>9.3} µs   (once per blueprint load, not per job)",
        "parse a condition",
        per_call.as_secs_f64() * 1e6
    );

    // 2. Choosing successors for a node with 10 conditional outgoing edges.
    let mut nodes = vec![json!({"id": "s", "uses": "noop"})];
    let mut edges = Vec::new();
    for i in 0..10 {
        nodes.push(json!({"id": format!("t{i}"), "uses": "noop"}));
        edges.push(json!({"source": "s", "target": format!("t{i}"),
            "condition": format!("result.output.total > {} && mode == 'fast'", i * 20)}));
    }
    let bp =
        Blueprint::from_json(&json!({"id": "fan10", "nodes": nodes, "edges": edges}).to_string())
            .unwrap();
    let node_result = NodeResult::output(json!({"total": 150, "items": [1, 2, 3]}));
    report(
        "choose successors (10 conditional edges)",
        measure(budget, || {
            black_box(choose_successors(
                &bp,
                0,
                None,
                black_box(&node_result),
                &context,
            ));
        }),
        20.0,
    );

    // 3. Local runner overhead per node: a 1 000-node chain of no-op closures.
    let n = 1000;
    let chain = Blueprint::from_json(
        &json!({
            "id": "chain",
            "nodes": (0..n).map(|i| json!({"id": format!("n{i}"), "uses": "noop"})).collect::<Vec<_>>(),
            "edges": (1..n).map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")})).collect::<Vec<_>>(),
        })
        .to_string(),
    )
    .unwrap();
    let mut registry = NodeRegistry::new();
    registry.register_fn("noop", |_| Ok(NodeResult::output(Value::Null)));
    let runtime = LocalRuntime::new(registry.clone());
    let per_run = measure(budget, || {
        black_box(runtime.run(&chain, ContextMap::new()));
    });
    report(
        "local runner per node (1 000-node chain)",
        per_run / n,
        20.0,
    );

    // 4. Local runner per node with fan-out: 200 parallel no-op nodes on 4 threads.
    let wide = Blueprint::from_json(
        &json!({
            "id": "wide",
            "nodes": std::iter::once(json!({"id": "s", "uses": "noop"}))
                .chain((0..200).map(|i| json!({"id": format!("w{i}"), "uses": "noop"})))
                .collect::<Vec<_>>(),
            "edges": (0..200).map(|i| json!({"source": "s", "target": format!("w{i}")})).collect::<Vec<_>>(),
        })
        .to_string(),
    )
    .unwrap();
    let per_run = measure(budget, || {
        black_box(runtime.run(&wide, ContextMap::new()));
    });
    report(
        "local runner per node (200-wide fan-out)",
        per_run / 201,
        20.0,
    );
}
