//! The distributed worker against the real RabbitMQ, PostgreSQL and Redis.

mod common;

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::LocalRuntime;
use serde_json::json;

#[test]
fn workloads_complete_with_expected_outputs() {
    let env = TestEnv::new("workloads");
    let (chain, chain_expected) = workload("chain5");
    let (diamond, diamond_expected) = workload("diamond8");
    let worker = env.start_worker(inc_registry(), vec![chain.clone(), diamond.clone()], 4);
    let client = env.client(vec![chain, diamond]);
    let runs: Vec<(String, serde_json::Value)> = (0..5)
        .flat_map(|_| {
            [
                (
                    client.start_workflow("chain5", ContextMap::new()).unwrap(),
                    chain_expected.clone(),
                ),
                (
                    client
                        .start_workflow("diamond8", ContextMap::new())
                        .unwrap(),
                    diamond_expected.clone(),
                ),
            ]
        })
        .collect();
    for (run, expected) in &runs {
        let row = env.wait_for_status(run, "completed", WAIT);
        let result = row.result.unwrap();
        assert_eq!(result["status"], json!("completed"));
        let context = &result["context"];
        for (node, value) in expected.as_object().unwrap() {
            assert_eq!(context[format!("_outputs.{node}")], *value, "{run} {node}");
        }
        let serialized: serde_json::Value =
            serde_json::from_str(result["serializedContext"].as_str().unwrap()).unwrap();
        assert_eq!(&serialized, context);
    }
    worker.stop().unwrap();
}

#[test]
fn same_final_context_as_the_in_process_runner() {
    let env = TestEnv::new("parity");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blueprints");
    let (blueprints, problems) = flowcraft_rabbitmq::blueprint::load_dir(dir);
    assert!(problems.is_empty(), "{problems:?}");
    let ids = [
        "diamond",
        "routing",
        "conditions",
        "transform",
        "retry-fallback",
        "any-join",
        "loop",
        "batch",
        "batch-loop",
    ];
    let all: Vec<_> = blueprints.values().cloned().collect();
    let worker = env.start_worker(inc_registry(), all.clone(), 4);
    let client = env.client(all.clone());
    let local = LocalRuntime::builder(inc_registry())
        .blueprints(all)
        .build();
    for id in ids {
        let run = client.start_workflow(id, ContextMap::new()).unwrap();
        let row = env.wait_for_status(&run, "completed", WAIT);
        let distributed = row.result.unwrap()["context"].as_object().unwrap().clone();
        let in_process = local.run_by_id(id, ContextMap::new()).unwrap();
        assert_eq!(
            in_process.status,
            flowcraft_rabbitmq::RunStatus::Completed,
            "{id}"
        );
        let outputs = |c: &ContextMap| -> Vec<(String, serde_json::Value)> {
            let mut v: Vec<_> = c
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("_outputs.")
                        && !(id == "any-join" && k.as_str() == "_outputs.first")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(outputs(&distributed), outputs(&in_process.context), "{id}");
        assert_eq!(distributed.contains_key("_outputs.first"), id == "any-join");
    }
    worker.stop().unwrap();
}
