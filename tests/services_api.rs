//! The public blocking APIs over PostgreSQL and Redis: `PostgresContext` and
//! `RedisCoordinationStore`.

mod common;

use std::time::Duration;

use common::*;
use flowcraft_rabbitmq::context::PatchOp;
use flowcraft_rabbitmq::coordination::{JoinRule, SuccessorReport};
use flowcraft_rabbitmq::migrate;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::store::{CommitGuard, NodeCommit};
use flowcraft_rabbitmq::{PostgresContext, RedisCoordinationStore, RunStatus};
use serde_json::json;

#[test]
fn postgres_context_round_trips_any_key_as_a_parameter() {
    let env = TestEnv::new("pgctx");
    let ctx = PostgresContext::new(env.pg.clone(), &env.tables.contexts, "run-1").unwrap();
    assert_eq!(ctx.get("missing").unwrap(), None);
    assert_eq!(ctx.to_json().unwrap(), json!({}));
    let nasty = "a'}; DROP TABLE x; --";
    ctx.set(nasty, json!({"v": 1})).unwrap();
    ctx.set("_outputs.n1", json!(null)).unwrap();
    assert_eq!(ctx.get(nasty).unwrap(), Some(json!({"v": 1})));
    assert!(ctx.has(nasty).unwrap());
    assert!(ctx.has("_outputs.n1").unwrap());
    assert_eq!(ctx.get("_outputs.n1").unwrap(), Some(json!(null)));
    ctx.patch(&[
        PatchOp::Set("k".into(), json!(2)),
        PatchOp::Delete(nasty.into()),
        PatchOp::Set("k".into(), json!(3)),
    ])
    .unwrap();
    assert!(!ctx.has(nasty).unwrap());
    assert_eq!(ctx.to_json().unwrap(), json!({"_outputs.n1": null, "k": 3}));
    ctx.delete("k").unwrap();
    assert_eq!(ctx.to_json().unwrap(), json!({"_outputs.n1": null}));
    // The table still exists and holds exactly this row.
    let rows = env.count_rows(&env.tables.contexts);
    assert_eq!(rows, 1);
}

#[test]
fn table_names_are_validated() {
    let env = TestEnv::new("pgname");
    let err = PostgresContext::new(env.pg.clone(), "x; DROP TABLE y", "r")
        .err()
        .unwrap();
    assert!(err.to_string().contains("invalid table name"), "{err}");
}

#[test]
fn redis_coordination_primitives() {
    let env = TestEnv::new("redis");
    let store = RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone());
    let ttl = Duration::from_secs(60);
    let k = store.key("counter");
    assert_eq!(store.increment(&k, ttl).unwrap(), 1);
    assert_eq!(store.increment(&k, ttl).unwrap(), 2);
    let lock = store.key("lock");
    assert!(store.set_if_not_exist(&lock, "me", ttl).unwrap());
    assert!(!store.set_if_not_exist(&lock, "you", ttl).unwrap());
    assert_eq!(store.get(&lock).unwrap().as_deref(), Some("me"));
    assert!(store.extend_ttl(&lock, ttl).unwrap());
    store.delete(std::slice::from_ref(&lock)).unwrap();
    assert_eq!(store.get(&lock).unwrap(), None);
    assert!(!store.extend_ttl(&lock, ttl).unwrap());
    let join = store.key("join");
    assert_eq!(store.join_report(&join, "a", ttl).unwrap(), 1);
    assert_eq!(
        store.join_report(&join, "a", ttl).unwrap(),
        1,
        "the same predecessor counts once"
    );
    assert_eq!(store.join_report(&join, "b", ttl).unwrap(), 2);
}

#[test]
fn finish_job_fires_joins_once_and_tracks_outstanding_work() {
    let env = TestEnv::new("ledger");
    let store = RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone());
    let report = |pred: &str, rule: JoinRule| SuccessorReport {
        job: "j".into(),
        node: "j".into(),
        iteration: 0,
        predecessor: pred.into(),
        rule,
    };
    let starts = vec!["a".to_string(), "b".to_string()];
    // a finishes: the all-join of 2 is not ready; b is still outstanding.
    let out = store
        .finish_job("run", "a", &starts, &[report("a", JoinRule::All(2))])
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![false], false));
    // a again (a duplicate): nothing changes.
    let out = store
        .finish_job("run", "a", &starts, &[report("a", JoinRule::All(2))])
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![false], false));
    // b finishes: the join fires, and j is outstanding.
    let out = store
        .finish_job("run", "b", &starts, &[report("b", JoinRule::All(2))])
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![true], false));
    // b redelivered: it fired the join, so it fires it again (its successors are re-published).
    let out = store
        .finish_job("run", "b", &starts, &[report("b", JoinRule::All(2))])
        .unwrap();
    assert_eq!(out.ready, vec![true]);
    // a cannot fire it.
    let out = store
        .finish_job("run", "a", &starts, &[report("a", JoinRule::All(2))])
        .unwrap();
    assert_eq!(out.ready, vec![false]);
    // j finishes with no successors: the run is idle, and its ledger, made with the start
    // jobs, vouches for that.
    let out = store.finish_job("run", "j", &[], &[]).unwrap();
    assert!(out.run_idle && out.ledger_intact);
    assert_eq!(store.outstanding_jobs("run").unwrap(), (vec![], true));
    // A ledger made after its run's start (Redis lost it) cannot vouch.
    let out = store.finish_job("remade", "x", &[], &[]).unwrap();
    assert!(out.run_idle && !out.ledger_intact);
    // An any-join: the first predecessor wins.
    let any = |pred: &str| SuccessorReport {
        job: "k".into(),
        node: "k".into(),
        iteration: 0,
        predecessor: pred.into(),
        rule: JoinRule::Any,
    };
    assert_eq!(
        store
            .finish_job("run2", "x", &[], &[any("x")])
            .unwrap()
            .ready,
        vec![true]
    );
    assert_eq!(
        store
            .finish_job("run2", "y", &[], &[any("y")])
            .unwrap()
            .ready,
        vec![false]
    );
}

/// A worker publishes a node's immediate successors before the node's Redis step, so a
/// successor may finish first — even a chain of them. The run must not look idle while
/// any job of that chain has yet to report (a join it would fire would be lost).
#[test]
fn successors_finishing_before_their_publishers_redis_step_keep_the_run_busy() {
    let env = TestEnv::new("ledger_early");
    let store = RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone());
    let to = |node: &str, pred: &str, rule: JoinRule| SuccessorReport {
        job: node.into(),
        node: node.into(),
        iteration: 0,
        predecessor: pred.into(),
        rule,
    };
    // The start jobs s and q report (a start job publishes after its Redis step): s makes
    // a ready, q reports to the join j. Then a publishes b and b publishes c (the last
    // node), each before its own Redis step, and c finishes first.
    let starts = vec!["q".to_string(), "s".to_string()];
    let out = store
        .finish_job("run", "s", &starts, &[to("a", "s", JoinRule::Immediate)])
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![true], false));
    let out = store
        .finish_job("run", "q", &starts, &[to("j", "q", JoinRule::All(2))])
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![false], false));
    let out = store.finish_job("run", "c", &[], &[]).unwrap();
    assert!(
        !out.run_idle,
        "c finished first, but a and b have not reported"
    );
    let out = store
        .finish_job("run", "b", &[], &[to("c", "b", JoinRule::Immediate)])
        .unwrap();
    assert!(!out.run_idle, "a has not reported");
    // a reports last: the join fires, and the run waits for j.
    let out = store
        .finish_job(
            "run",
            "a",
            &[],
            &[
                to("b", "a", JoinRule::Immediate),
                to("j", "a", JoinRule::All(2)),
            ],
        )
        .unwrap();
    assert_eq!((out.ready.clone(), out.run_idle), (vec![true, true], false));
    let out = store.finish_job("run", "j", &[], &[]).unwrap();
    assert!(out.run_idle && out.ledger_intact);
}

#[test]
fn client_wait_returns_when_the_run_stops_running_or_the_time_is_up() {
    let env = TestEnv::new("client_wait");
    let (chain, _) = workload("chain5");
    let client = env.client(vec![chain.clone()]);
    // No worker yet: the run stays `running` and the wait ends at its timeout.
    let run = client.start_workflow("chain5", ContextMap::new()).unwrap();
    let row = client.wait(&run, Duration::from_millis(100)).unwrap();
    assert_eq!(row.status, "running");
    let worker = env.start_worker(inc_registry(), vec![chain], 2);
    let row = client.wait(&run, Duration::from_secs(30)).unwrap();
    assert_eq!(row.status, "completed");
    assert_eq!(row.result.unwrap()["context"]["_outputs.n5"], json!(5));
    let err = client
        .wait("no-such-run", Duration::from_secs(1))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    worker.stop().unwrap();
}

#[test]
fn pool_sessions_are_tuned_unless_built_untuned() {
    let setting = |manager: flowcraft_rabbitmq::store::PgConnectionManager| -> String {
        let pool = r2d2::Pool::builder().max_size(1).build(manager).unwrap();
        let mut conn = pool.get().unwrap();
        conn.query_one("SHOW enable_seqscan", &[])
            .unwrap()
            .get::<_, String>(0)
    };
    let config: postgres::Config = postgres_url().parse().unwrap();
    let manager = flowcraft_rabbitmq::store::PgConnectionManager::new;
    assert_eq!(setting(manager(config.clone())), "off");
    assert_eq!(setting(manager(config).untuned()), "on");
}

#[test]
fn a_postgresql_error_carries_its_sqlstate_and_message() {
    // Tables that were never migrated: the statement fails in PostgreSQL itself, and the
    // error says why (it used to print only "PostgreSQL: db error").
    let env = TestEnv::new("pgerr");
    let unmigrated = format!("{}_never_created", env.tables.contexts);
    let ctx = PostgresContext::new(env.pg.clone(), &unmigrated, "run-1").unwrap();
    let err = ctx.get("k").unwrap_err().to_string();
    assert!(err.contains("42P01"), "{err}");
    assert!(
        err.contains(&format!("relation \"{unmigrated}\" does not exist")),
        "{err}"
    );
}

#[test]
fn data_postgresql_refuses_is_a_permanent_error_and_a_missing_table_is_not() {
    let env = TestEnv::new("pgperm");
    let mut conn = env.pg.get().unwrap();
    let nul = conn
        .query_one("SELECT $1::text::jsonb", &[&r#"{"a": "x\u0000y"}"#])
        .unwrap_err();
    let nul = flowcraft_rabbitmq::StoreError::from(nul);
    assert!(nul.is_permanent(), "{nul}");
    let missing = conn
        .query_one("SELECT * FROM flowcraft_never_made_either", &[])
        .unwrap_err();
    let missing = flowcraft_rabbitmq::StoreError::from(missing);
    assert!(!missing.is_permanent(), "{missing}");
}

#[test]
fn migrating_moves_the_records_of_runs_under_way_to_their_own_rows() {
    // Tables as the first release created them, holding a run whose node `a` is committed
    // and whose node `w` is awaited, all in its one context row.
    let env = TestEnv::without_tables("pgmigrate");
    let mut conn = env.pg.get().unwrap();
    conn.batch_execute(&migrate::render(migrate::MIGRATIONS[0].1, &env.tables).unwrap())
        .unwrap();
    conn.execute(
        "INSERT INTO flowcraft_migrations (version, scope) VALUES ($1, $2)",
        &[&migrate::MIGRATIONS[0].0, &migrate::scope(&env.tables)],
    )
    .unwrap();
    let before = json!({
        "blueprintId": "bp", "x": 1,
        "_outputs.a": 2, "a": 2, "_inputs.w": 2, "_node.a": {"next": []},
        "_awaitingNodeIds": ["w"], "_awaitingDetails": {"w": {"type": "webhook"}},
    });
    conn.execute(
        &format!(
            "INSERT INTO {} (run_id, context_data) VALUES ('old', $1)",
            env.tables.contexts
        ),
        &[&before],
    )
    .unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {} (run_id, status) VALUES ('old', 'awaiting')",
            env.tables.statuses
        ),
        &[],
    )
    .unwrap();

    let applied = migrate::migrate(&env.pg, &env.tables).unwrap();
    assert_eq!(applied, ["0002_entries", "0003_history"]);
    assert!(migrate::migrate(&env.pg, &env.tables).unwrap().is_empty());

    // The starting row keeps what a client could have put there; the run's records moved.
    let starting: serde_json::Value = conn
        .query_one(
            &format!(
                "SELECT context_data FROM {} WHERE run_id = 'old'",
                env.tables.contexts
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(starting, json!({"blueprintId": "bp", "x": 1, "a": 2}));
    assert_eq!(env.count_rows(&env.tables.entries()), 5);
    // The run reads as it did, whole or key by key.
    let store = env.store();
    assert_eq!(
        serde_json::Value::Object(store.load("old").unwrap().unwrap().context),
        before
    );
    let keys = ["_outputs.a", "blueprintId", "x", "_outputs.w"].map(String::from);
    let some = store.load_keys("old", keys.to_vec()).unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(some.context),
        json!({"_outputs.a": 2, "blueprintId": "bp", "x": 1})
    );
    // Its committed node stays committed, and its awaited node resumes once.
    let guard = |node: &str| CommitGuard {
        output_key: format!("_outputs.{node}"),
        meta_key: format!("_node.{node}"),
        iteration: 0,
        repeats: false,
    };
    let mut again = NodeCommit::default();
    again.set.insert("_outputs.a".into(), json!(3));
    assert!(!store.commit_node("old", again, guard("a")).unwrap());
    let mut resumed = NodeCommit::default();
    resumed.set.insert("_outputs.w".into(), json!("event"));
    assert!(store
        .resume_nodes("old", &["w".into()], resumed.clone())
        .unwrap());
    assert!(!store.resume_nodes("old", &["w".into()], resumed).unwrap());
    let after = store.load("old").unwrap().unwrap();
    assert_eq!(after.status, Some(RunStatus::Running));
    assert_eq!(after.context.get("_outputs.a"), Some(&json!(2)));
    assert_eq!(after.context.get("_outputs.w"), Some(&json!("event")));
    assert!(!after.context.contains_key("_awaitingNodeIds"));
    assert!(!after.context.contains_key("_awaitingDetails"));
}

#[test]
fn a_paced_publisher_waits_for_confirms_once_too_many_are_outstanding() {
    use flowcraft_rabbitmq::testing::amqp::{self, AsyncPublisher, JobSink, MAX_UNCONFIRMED};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let env = TestEnv::new("paced");
    let mut connection = amqp::connect(&amqp_url()).unwrap();
    let channel = connection.open_channel(None).unwrap();
    amqp::declare_job_queue(&channel, &env.queue).unwrap();
    let (mut publisher, _confirms) =
        AsyncPublisher::new(connection.open_channel(None).unwrap()).unwrap();
    // Nobody records the broker's confirms: the watermark moves only when the test says.
    let confirmed = Arc::new(AtomicU64::new(0));
    publisher.pace_with(confirmed.clone());
    let total = MAX_UNCONFIRMED + 10;
    let queue = env.queue.clone();
    let publishing = std::thread::spawn(move || {
        let bodies: Vec<Vec<u8>> = (0..total).map(|i| i.to_string().into_bytes()).collect();
        publisher
            .publish_jobs("", &queue, &bodies)
            .map(|()| publisher.published())
    });
    env.eventually(
        "the first window is published",
        Duration::from_secs(20),
        || u64::from(env.queue_depth(&env.queue)) >= MAX_UNCONFIRMED,
    );
    assert!(!publishing.is_finished(), "it published past the window");
    assert_eq!(u64::from(env.queue_depth(&env.queue)), MAX_UNCONFIRMED);
    confirmed.store(MAX_UNCONFIRMED, Ordering::Release);
    assert_eq!(publishing.join().unwrap().unwrap(), total);
    env.eventually("the rest is published", Duration::from_secs(20), || {
        u64::from(env.queue_depth(&env.queue)) == total
    });
}

/// A queue's depth, or `None` when it does not exist — whatever its name holds.
#[test]
fn a_missing_queue_has_no_depth() {
    use flowcraft_rabbitmq::testing::amqp;
    let env = TestEnv::new("queue_depth");
    let mut connection = amqp::connect(&amqp_url()).unwrap();
    let channel = connection.open_channel(None).unwrap();
    let missing = format!("{}.missing404", env.queue);
    assert_eq!(amqp::queue_depth(&channel, &missing).unwrap(), None);
    // The server closed that channel: ask on a new one.
    let channel = connection.open_channel(None).unwrap();
    amqp::declare_job_queue(&channel, &env.queue).unwrap();
    assert_eq!(amqp::queue_depth(&channel, &env.queue).unwrap(), Some(0));
    let _ = connection.close();
}
