//! Shared harness of the integration tests: every test gets its own tables, queue and Redis
//! key prefix, removes them when it ends, and fails loudly if a service is down.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use flowcraft_rabbitmq::coordination::{self, RedisPool};
use flowcraft_rabbitmq::migrate;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::store::{
    self, CommitGuard, NodeCommit, PgPool, RunStore, StatusRow, Tables,
};
use flowcraft_rabbitmq::testing::amqp;
use flowcraft_rabbitmq::testing::amqp::JobSink;
use flowcraft_rabbitmq::{
    Blueprint, Client, NodeRegistry, NodeResult, RabbitMqAdapter, Reconciler,
    RedisCoordinationStore, WebhookOptions, WebhookServer, WorkerHandle,
};
use serde_json::{json, Value};

pub fn amqp_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One test's isolated slice of the three services.
pub struct TestEnv {
    pub tag: String,
    pub tables: Tables,
    pub queue: String,
    pub prefix: String,
    pub pg: PgPool,
    pub redis: RedisPool,
    /// More queues to delete at the end (delay queues, the demo's queues).
    pub extra_queues: Vec<String>,
}

impl TestEnv {
    pub fn new(name: &str) -> TestEnv {
        TestEnv::create(name, true)
    }

    /// Like [`TestEnv::new`], but leaves creating the tables to the test (`flowcraft migrate`).
    pub fn without_tables(name: &str) -> TestEnv {
        TestEnv::create(name, false)
    }

    fn create(name: &str, with_tables: bool) -> TestEnv {
        let tag = format!(
            "{name}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let tables = Tables::new(
            &format!("ctx_{tag}"),
            &format!("st_{tag}"),
            &format!("wh_{tag}"),
        )
        .unwrap();
        let pg = store::connect_pool(&postgres_url(), 8)
            .expect("PostgreSQL must be running for integration tests");
        drop(
            pg.get()
                .expect("PostgreSQL must be running for integration tests"),
        );
        if with_tables {
            migrate::migrate(&pg, &tables).expect("create test tables");
        }
        let redis = coordination::connect_pool(&redis_url(), 8).expect("Redis must be running");
        redis::cmd("PING")
            .query::<String>(
                &mut *redis
                    .get()
                    .expect("Redis must be running for integration tests"),
            )
            .expect("Redis PING");
        let env = TestEnv {
            queue: format!("fc-test-{tag}"),
            prefix: format!("fctest:{tag}:"),
            tag,
            tables,
            pg,
            redis,
            extra_queues: Vec::new(),
        };
        // Fail loudly when RabbitMQ is down.
        amqp::connect(&amqp_url()).expect("RabbitMQ must be running for integration tests");
        env
    }

    pub fn store(&self) -> RunStore {
        RunStore::new(self.pg.clone(), self.tables.clone()).unwrap()
    }

    /// This test's events exchange.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.queue)
    }

    pub fn worker(
        &self,
        registry: NodeRegistry,
        blueprints: Vec<Blueprint>,
    ) -> flowcraft_rabbitmq::worker::RabbitMqAdapterBuilder {
        self.worker_with(self.pg.clone(), self.redis.clone(), registry, blueprints)
    }

    /// A worker of this test on its own PostgreSQL and Redis pools.
    pub fn worker_with(
        &self,
        pg: PgPool,
        redis: RedisPool,
        registry: NodeRegistry,
        blueprints: Vec<Blueprint>,
    ) -> flowcraft_rabbitmq::worker::RabbitMqAdapterBuilder {
        RabbitMqAdapter::builder(amqp_url(), pg, redis)
            .registry(registry)
            .blueprints(blueprints)
            .events_exchange(self.events_exchange())
            .queue(self.queue.clone())
            .tables(self.tables.clone())
            .redis_prefix(self.prefix.clone())
            .reconcile_every(None)
    }

    /// Starts the worker `builder` makes, serving its metrics on a free port; the worker
    /// and that address.
    pub fn start_serving_metrics(
        builder: flowcraft_rabbitmq::worker::RabbitMqAdapterBuilder,
    ) -> (WorkerHandle, std::net::SocketAddr) {
        let worker = builder
            .metrics_listen("127.0.0.1:0")
            .build()
            .unwrap()
            .start()
            .unwrap();
        let addr = worker.metrics_addr().expect("metrics are served");
        (worker, addr)
    }

    pub fn start_worker(
        &self,
        registry: NodeRegistry,
        blueprints: Vec<Blueprint>,
        threads: usize,
    ) -> WorkerHandle {
        self.worker(registry, blueprints)
            .threads(threads)
            .build()
            .unwrap()
            .start()
            .unwrap()
    }

    /// A worker with `threads` threads, started, and a reconciler over the same services for
    /// which a running run is stalled after `stalled_after`.
    pub fn reconciling_worker(
        &self,
        registry: NodeRegistry,
        blueprints: Vec<Blueprint>,
        threads: usize,
        stalled_after: Duration,
    ) -> (Reconciler, WorkerHandle) {
        let worker = self
            .worker(registry, blueprints)
            .threads(threads)
            .stalled_after(stalled_after)
            .build()
            .unwrap();
        let reconciler = worker.reconciler();
        (reconciler, worker.start().unwrap())
    }

    pub fn client(&self, blueprints: Vec<Blueprint>) -> Client {
        Client::with_options(
            amqp_url(),
            self.pg.clone(),
            self.redis.clone(),
            self.tables.clone(),
            &self.queue,
            &self.prefix,
        )
        .unwrap()
        .with_blueprints(blueprints)
    }

    /// Starts a run of `bp` through a client that knows only `bp`; returns the run id.
    pub fn start_run(&self, bp: &Blueprint, context: ContextMap) -> String {
        self.client(vec![bp.clone()])
            .start_workflow(bp.id(), context)
            .unwrap()
    }

    /// Polls a run's status until it leaves `running` (or reaches `want`), with a deadline.
    pub fn wait_for_status(&self, run: &str, want: &str, within: Duration) -> StatusRow {
        let store = self.store();
        let deadline = Instant::now() + within;
        loop {
            let row = store.status(run).unwrap();
            if let Some(row) = &row {
                if row.status == want {
                    return row.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "run {run} did not reach '{want}' within {within:?}; last: {row:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until `check` holds, with a deadline.
    pub fn eventually(&self, what: &str, within: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn context(&self, run: &str) -> ContextMap {
        self.store().load(run).unwrap().expect("run exists").context
    }

    /// Publishes a raw message to the test queue (declaring it).
    pub fn publish_raw(&self, body: &[u8]) {
        let mut conn = amqp::connect(&amqp_url()).unwrap();
        let mut publisher = amqp::ConfirmPublisher::new(conn.open_channel(None).unwrap()).unwrap();
        amqp::declare_job_queue(publisher.channel(), &self.queue).unwrap();
        publisher
            .publish_jobs("", &self.queue, &[body.to_vec()])
            .unwrap();
        let _ = publisher.close();
        let _ = conn.close();
    }

    /// Messages currently in a queue of this test.
    pub fn queue_depth(&self, queue: &str) -> u32 {
        let mut conn = amqp::connect(&amqp_url()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        let depth = amqp::queue_depth(&ch, queue).unwrap().unwrap_or(0);
        let _ = conn.close();
        depth
    }

    /// Consumers currently attached to a queue of this test.
    pub fn consumer_count(&self, queue: &str) -> u32 {
        let mut conn = amqp::connect(&amqp_url()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        let count = ch
            .queue_declare_passive(queue)
            .map(|q| q.declared_consumer_count().unwrap_or(0))
            .unwrap_or(0);
        let _ = conn.close();
        count
    }

    /// Takes one message off a queue of this test.
    pub fn take_message(&self, queue: &str) -> Option<Vec<u8>> {
        let mut conn = amqp::connect(&amqp_url()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        let got = ch
            .basic_get(queue, true)
            .ok()
            .flatten()
            .map(|g| g.delivery.body);
        let _ = conn.close();
        got
    }

    /// Deletes every Redis key of this test, as a Redis restart without persistence does;
    /// returns how many there were.
    pub fn forget_coordination(&self) -> usize {
        let Ok(mut c) = self.redis.get() else {
            return 0;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut *c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _ = redis::cmd("DEL").arg(&keys).query::<()>(&mut *c);
        }
        keys.len()
    }

    pub fn purge(&self) -> u32 {
        self.purge_queue(&self.queue)
    }

    /// Empties a queue; returns how many messages it dropped.
    pub fn purge_queue(&self, queue: &str) -> u32 {
        let mut conn = amqp::connect(&amqp_url()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        let n = ch.queue_purge(queue).unwrap_or(0);
        let _ = conn.close();
        n
    }

    /// The `flowcraft` binary, pointed at this test's slice (and at no blueprint directory
    /// or dashboard token the caller's environment may set).
    pub fn flowcraft_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"));
        command
            .env_remove("FLOWCRAFT_BLUEPRINTS")
            .env_remove("FLOWCRAFT_DASHBOARD_TOKEN")
            .envs(self.cli_env());
        command
    }

    /// Environment variables that point the `flowcraft` binary at this test's slice.
    fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("RABBITMQ_URL".into(), amqp_url()),
            ("POSTGRES_URL".into(), postgres_url()),
            ("REDIS_URL".into(), redis_url()),
            ("FLOWCRAFT_QUEUE".into(), self.queue.clone()),
            (
                "FLOWCRAFT_CONTEXTS_TABLE".into(),
                self.tables.contexts.clone(),
            ),
            (
                "FLOWCRAFT_STATUSES_TABLE".into(),
                self.tables.statuses.clone(),
            ),
            (
                "FLOWCRAFT_WEBHOOKS_TABLE".into(),
                self.tables.webhooks.clone(),
            ),
            ("FLOWCRAFT_REDIS_PREFIX".into(), self.prefix.clone()),
            ("FLOWCRAFT_EVENTS_EXCHANGE".into(), self.events_exchange()),
        ]
    }

    /// The rows of one of this test's tables.
    pub fn count_rows(&self, table: &str) -> i64 {
        self.pg
            .get()
            .unwrap()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap()
            .get(0)
    }

    /// A webhook receiver over this test's services, on a free port.
    pub fn webhook_receiver(&self, secret: Option<&str>, max_body: usize) -> WebhookServer {
        WebhookServer::start(
            "127.0.0.1:0",
            WebhookOptions {
                store: self.store(),
                coord: RedisCoordinationStore::new(self.redis.clone(), self.prefix.clone()),
                amqp_url: amqp_url(),
                exchange: self.events_exchange(),
                secret: secret.map(String::from),
                max_body,
            },
        )
        .unwrap()
    }

    pub fn dead_queue(&self) -> String {
        amqp::dead_letter_queue(&self.queue)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(mut c) = self.pg.get() {
            let _ = c.batch_execute(&format!(
                "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; \
                 DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
                self.tables.contexts,
                self.tables.entries(),
                self.tables.statuses,
                self.tables.history(),
                self.tables.webhooks
            ));
            let scope = migrate::scope(&self.tables);
            let _ = c.execute(
                "DELETE FROM flowcraft_migrations WHERE scope = $1",
                &[&scope],
            );
        }
        self.forget_coordination();
        if let Ok(mut conn) = amqp::connect(&amqp_url()) {
            if let Ok(ch) = conn.open_channel(None) {
                let mut queues = vec![self.queue.clone(), self.dead_queue()];
                queues.extend(self.extra_queues.iter().cloned());
                for q in queues {
                    let _ = ch.queue_delete(q, Default::default());
                }
                let _ = ch.exchange_delete(self.events_exchange(), false);
            }
            let _ = conn.close();
        }
    }
}

/// A registry with the built-ins plus `inc` (input + 1, absent → 1), as in the bench workloads.
pub fn inc_registry() -> NodeRegistry {
    let mut r = NodeRegistry::with_builtins();
    r.register_fn("inc", |ctx| {
        Ok(NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) + 1
        )))
    });
    r
}

/// [`inc_registry`] with `flaky`, which fails each node's first attempt with `retried` and
/// then passes its input on, and `broken`, which fails for good with `broken`.
pub fn flaky_registry(retried: &'static str, broken: &'static str) -> NodeRegistry {
    let mut r = inc_registry();
    r.register_fn("flaky", move |ctx| {
        if ctx.attempt == 1 {
            return Err(flowcraft_rabbitmq::node::NodeError::new(retried));
        }
        Ok(NodeResult::output(ctx.input.clone()))
    });
    r.register_fn("broken", move |_| {
        Err(flowcraft_rabbitmq::node::NodeError::fatal(broken))
    });
    r
}

/// Registers node type `uses` as a gate: each execution says it entered, then waits (up to
/// [`WAIT`]) to be released and outputs `output`; a gate never released fails its node.
/// Returns the receiver of "entered" and the sender of "release".
pub fn gated_node(
    registry: &mut NodeRegistry,
    uses: &str,
    output: Value,
) -> (
    crossbeam_channel::Receiver<()>,
    crossbeam_channel::Sender<()>,
) {
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    registry.register_fn(uses, move |_| {
        let _ = entered_tx.send(());
        release_rx
            .recv_timeout(WAIT)
            .map_err(|_| flowcraft_rabbitmq::node::NodeError::new("never released"))?;
        Ok(NodeResult::output(output.clone()))
    });
    (entered_rx, release_tx)
}

/// Registers node type `uses`, which outputs `output` and counts its executions in the
/// counter returned.
pub fn counted_node(
    registry: &mut NodeRegistry,
    uses: &str,
    output: Value,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    registry.register_fn(uses, move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(NodeResult::output(output.clone()))
    });
    count
}

pub fn workload(name: &str) -> (Blueprint, Value) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/workloads.json"
    ))
    .unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let w = &all["workloads"][name];
    (
        Blueprint::new(serde_json::from_value(w["blueprint"].clone()).unwrap()).unwrap(),
        w["expectedOutputs"].clone(),
    )
}

/// The bundled example blueprints.
pub const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blueprints");

/// Every blueprint of [`EXAMPLES_DIR`] by id, which must all be valid.
fn load_examples() -> std::collections::BTreeMap<String, Blueprint> {
    let (blueprints, problems) = flowcraft_rabbitmq::blueprint::load_dir(EXAMPLES_DIR);
    assert!(problems.is_empty(), "{problems:?}");
    blueprints
}

/// Every blueprint of [`EXAMPLES_DIR`].
pub fn examples() -> Vec<Blueprint> {
    load_examples().into_values().collect()
}

/// A blueprint of [`EXAMPLES_DIR`].
pub fn example(id: &str) -> Blueprint {
    load_examples().remove(id).expect("an example blueprint")
}

pub fn bp(text: &str) -> Blueprint {
    Blueprint::from_json(text).unwrap()
}

/// The commit of output `value` for node `node` (iteration 0, not repeating), with its guard.
pub fn commit_of(node: &str, value: Value) -> (NodeCommit, CommitGuard) {
    let mut commit = NodeCommit::default();
    commit.set.insert(format!("_outputs.{node}"), value);
    let guard = CommitGuard {
        output_key: format!("_outputs.{node}"),
        meta_key: format!("_node.{node}"),
        iteration: 0,
        repeats: false,
    };
    (commit, guard)
}

pub fn ctx(v: Value) -> ContextMap {
    v.as_object().cloned().unwrap_or_default()
}

pub const WAIT: Duration = Duration::from_secs(30);

/// A minimal HTTP/1.1 POST; returns the status code and the body.
pub fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_request("POST", addr, path, body, headers)
}

/// A minimal HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_request("GET", addr, path, b"", headers)
}

/// A minimal HTTP/1.1 request; returns the status code and the body (status 0 when nothing
/// listens there yet).
pub fn http_request(
    method: &str,
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let _ = stream.write_all(request.as_bytes());
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The counter loop of Flowcraft's loops guide: `initialize` sets `count` to 0, `increment`
/// adds one, and the controller continues while `context.count < 5`.
pub fn flowcraft_counter_loop() -> (
    flowcraft_rabbitmq::Blueprint,
    flowcraft_rabbitmq::NodeRegistry,
) {
    let mut registry = inc_registry();
    registry.register_fn("initialize", |ctx| {
        ctx.context.set("count", json!(0));
        Ok(NodeResult::output(json!("Initialized")))
    });
    registry.register_fn("increment", |ctx| {
        let count = ctx
            .context
            .get("count")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        ctx.context.set("count", json!(count));
        Ok(NodeResult::output(json!(count)))
    });
    let b = bp(r#"{"id":"loop-workflow","nodes":[
        {"id":"initialize","uses":"initialize"},
        {"id":"increment","uses":"increment","config":{"joinStrategy":"any"}},
        {"id":"counter-loop","uses":"loop-controller","params":{"condition":"context.count < 5"},
         "config":{"joinStrategy":"any"}}],
        "edges":[{"source":"initialize","target":"increment"},
                 {"source":"increment","target":"counter-loop"},
                 {"source":"counter-loop","target":"increment","action":"continue"}]}"#);
    (b, registry)
}

/// The batch of Flowcraft's batch-processing guide: `start` yields [10, 20, 30], each item
/// is doubled by a worker, the gather stores the results under `doubled`, and `sum-results`
/// (inputs: "doubled") sums them: 120.
pub fn flowcraft_batch_guide() -> (Blueprint, NodeRegistry) {
    let mut registry = inc_registry();
    registry.register_fn("start", |_| Ok(NodeResult::output(json!([10, 20, 30]))));
    registry.register_fn("double", |ctx| {
        Ok(NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) * 2
        )))
    });
    registry.register_fn("sum", |ctx| {
        let sum: i64 = ctx
            .input
            .as_array()
            .map_or(0, |items| items.iter().filter_map(Value::as_i64).sum());
        Ok(NodeResult::output(json!(sum)))
    });
    let b = bp(r#"{"id":"batch-workflow","nodes":[
        {"id":"start","uses":"start"},
        {"id":"double-items_scatter","uses":"batch-scatter",
         "params":{"workerUsesKey":"double","gatherNodeId":"double-items_gather"}},
        {"id":"double-items_gather","uses":"batch-gather","params":{"outputKey":"doubled"}},
        {"id":"sum-results","uses":"sum","inputs":"doubled"}],
        "edges":[{"source":"start","target":"double-items_scatter"},
                 {"source":"double-items_scatter","target":"double-items_gather"},
                 {"source":"double-items_gather","target":"sum-results"}]}"#);
    (b, registry)
}

/// The fallback of Flowcraft's error-handling guide: `primary-api` always fails (two
/// attempts), `secondary-api` stands in, and `process-data` gets its output.
pub fn flowcraft_fallback_guide() -> (Blueprint, NodeRegistry) {
    let mut registry = inc_registry();
    registry.register_fn("primary", |_| {
        Err(flowcraft_rabbitmq::NodeError::new("Primary API is down"))
    });
    registry.register_fn("secondary", |_| {
        Ok(NodeResult::output(json!("Data from secondary API")))
    });
    registry.register_fn("process", |ctx| {
        Ok(NodeResult::output(json!(format!(
            "Processed: {}",
            ctx.input.as_str().unwrap_or_default()
        ))))
    });
    let b = bp(r#"{"id":"fallback-workflow","nodes":[
        {"id":"primary-api","uses":"primary","config":{"maxRetries":2,"fallback":"secondary-api"}},
        {"id":"secondary-api","uses":"secondary"},
        {"id":"process-data","uses":"process"}],
        "edges":[{"source":"primary-api","target":"process-data"},
                 {"source":"secondary-api","target":"process-data"}]}"#);
    (b, registry)
}
