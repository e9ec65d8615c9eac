//! Engine micro-benchmarks (no services): condition evaluation, successor choice, the
//! in-process runner's overhead per node, and how its cost per node or item grows with the
//! size of the run (chains of `transform` nodes, batches of `transform` workers). Run with
//! `cargo bench --bench engine` (`-- --quick` for short budgets, `-- --scale-max N` to stop
//! the growing runs at N nodes or items; default 100 000).

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

    // 5. Cost per node or item as runs grow: flat if nothing per node is proportional to the
    //    run's size.
    let scale_max: usize = std::env::args()
        .skip_while(|a| a != "--scale-max")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let builtins = LocalRuntime::new(NodeRegistry::with_builtins());
    for n in [100usize, 1_000, 10_000, 100_000] {
        if n > scale_max {
            break;
        }
        let chain = transform_chain(n);
        let started = Instant::now();
        let result = builtins.run(&chain, ContextMap::new());
        let took = started.elapsed();
        assert_eq!(result.context[&format!("_outputs.n{}", n - 1)], json!(n));
        println!(
            "{:<48} {:>9.3} µs   ({n} nodes in {:.2} s)",
            format!("local transform chain per node ({n} nodes)"),
            took.as_secs_f64() * 1e6 / n as f64,
            took.as_secs_f64()
        );
    }
    for n in [1_000usize, 10_000, 100_000] {
        if n > scale_max {
            break;
        }
        let batch = transform_batch();
        let items: Vec<Value> = (0..n).map(|i| json!(i)).collect();
        let mut context = ContextMap::new();
        context.insert("items".into(), Value::Array(items));
        let started = Instant::now();
        let result = builtins.run(&batch, context);
        let took = started.elapsed();
        let gathered = result.context["_outputs.gather"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(gathered, n);
        println!(
            "{:<48} {:>9.3} µs   ({n} items in {:.2} s)",
            format!("local batch per item ({n} items)"),
            took.as_secs_f64() * 1e6 / n as f64,
            took.as_secs_f64()
        );
    }
}

/// `n` `transform` nodes in a chain, each adding one to its input.
fn transform_chain(n: usize) -> Blueprint {
    let nodes: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("n{i}"), "uses": "transform", "params": {"expression": "(input ?? 0) + 1"}}))
        .collect();
    let edges: Vec<Value> = (1..n)
        .map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")}))
        .collect();
    Blueprint::from_json(&json!({"id": "tchain", "nodes": nodes, "edges": edges}).to_string())
        .unwrap()
}

/// A batch over the context's `items`: one `transform` worker (`input * 2`) per item.
fn transform_batch() -> Blueprint {
    Blueprint::from_json(
        &json!({"id": "tbatch", "nodes": [
            {"id": "items", "uses": "transform", "params": {"expression": "context.items"}},
            {"id": "scatter", "uses": "batch-scatter", "params": {"workerUsesKey": "transform",
                "workerParams": {"expression": "input * 2"}, "gatherNodeId": "gather"}},
            {"id": "gather", "uses": "batch-gather"}],
          "edges": [{"source": "items", "target": "scatter"}, {"source": "scatter", "target": "gather"}]})
        .to_string(),
    )
    .unwrap()
}
