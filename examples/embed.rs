//! Embedding flowcraft-rabbitmq as a blocking library: a custom node, a worker pool, a
//! client that starts a run and waits for it.
//!
//! Needs RabbitMQ, PostgreSQL and Redis (default local URLs, or RABBITMQ_URL, POSTGRES_URL,
//! REDIS_URL). Run with `cargo run --example embed`.

use std::time::Duration;

use flowcraft_rabbitmq::{
    connect_postgres, connect_redis, run_migrations, Blueprint, Client, ContextMap, NodeError,
    NodeRegistry, NodeResult, RabbitMqAdapter, Tables,
};
use serde_json::json;

const BLUEPRINT: &str = r#"{
  "id": "greeting",
  "metadata": {"version": "1"},
  "nodes": [
    {"id": "name", "uses": "transform", "params": {"expression": "context.name ?? 'world'"}},
    {"id": "greet", "uses": "greet"},
    {"id": "shout", "uses": "transform", "params": {"expression": "input + '!'"}}
  ],
  "edges": [
    {"source": "name", "target": "greet"},
    {"source": "greet", "target": "shout"}
  ]
}"#;

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let amqp_url = env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let pg = connect_postgres(
        &env(
            "POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ),
        8,
    )?;
    let redis = connect_redis(&env("REDIS_URL", "redis://127.0.0.1:6379"), 8)?;
    run_migrations(&pg, &Tables::default())?;

    // 1. Node implementations: the built-ins plus our own.
    let mut registry = NodeRegistry::with_builtins();
    registry.register_fn("greet", |ctx| {
        let name = ctx
            .input
            .as_str()
            .ok_or_else(|| NodeError::fatal("greet needs a string input"))?;
        ctx.context.set("greeted", json!(name));
        Ok(NodeResult::output(json!(format!("hello, {name}"))))
    });
    let blueprint = Blueprint::from_json(BLUEPRINT)?;

    // 2. A worker pool on its own queue (so it does not take other workers' jobs).
    let queue = "flowcraft-embed-example";
    let worker = RabbitMqAdapter::builder(&amqp_url, pg.clone(), redis.clone())
        .registry(registry)
        .blueprint(blueprint.clone())
        .queue(queue)
        .threads(4)
        .build()?
        .start()?;

    // 3. A client starts a run and polls its status.
    let client =
        Client::with_options(&amqp_url, pg, redis, Tables::default(), queue, "flowcraft:")?
            .with_blueprints([blueprint]);
    let mut context = ContextMap::new();
    context.insert("name".into(), json!("ada"));
    let run = client.start_workflow("greeting", context)?;
    let row = client.wait(&run, Duration::from_secs(30))?;
    if row.status == "running" {
        return Err("the run did not finish in 30 s".into());
    }
    let result = row.result.unwrap_or_default();
    println!("run {run}: {}", row.status);
    println!("shout = {}", result["context"]["_outputs.shout"]);

    // 4. Stop: no new jobs; in-flight jobs finish and are acked.
    worker.stop()?;
    Ok(())
}
