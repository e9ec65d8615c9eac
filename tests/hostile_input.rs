//! Hostile and odd input on every surface — webhook requests, job messages, events, timers,
//! node outputs, start contexts — and the worker keeps serving a normal run next to it:
//! nothing crashes, nothing wedges, no state is invented.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use flowcraft_rabbitmq::testing::amqp;
use flowcraft_rabbitmq::{ContextMap, WebhookServer};
use serde_json::json;

/// A receiver over this test's services (unsigned calls, 1 KiB bodies).
fn receiver(env: &TestEnv) -> WebhookServer {
    env.webhook_receiver(None, 1024)
}

/// Sends raw bytes and returns the status code of the answer (0: none before `within`).
fn raw_request(addr: SocketAddr, bytes: &[u8], within: Duration) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return 0;
    };
    stream.set_read_timeout(Some(within)).unwrap();
    let _ = stream.write_all(bytes);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A well-formed call of an unknown webhook: the receiver is serving when it answers 404.
fn answers_normally(addr: SocketAddr, within: Duration) -> bool {
    let request = b"POST /webhooks/no-run/no-node HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    raw_request(addr, request, within) == 404
}

#[test]
fn a_huge_content_length_is_refused_and_the_receiver_keeps_serving() {
    let env = TestEnv::new("hostile_cl");
    let server = receiver(&env);
    let addr = server.local_addr();
    for length in [
        "4611686018427387904",
        "18446744073709551615",
        "99999999999999999999",
    ] {
        for _ in 0..3 {
            let head = format!("POST /webhooks/x/y HTTP/1.1\r\nContent-Length: {length}\r\n\r\n");
            let status = raw_request(addr, head.as_bytes(), Duration::from_secs(5));
            assert!(status == 413 || status == 400, "{length}: {status}");
        }
    }
    assert!(answers_normally(addr, Duration::from_secs(5)));
    server.stop();
}

#[test]
fn slow_and_silent_clients_hold_no_thread() {
    let env = TestEnv::new("hostile_slow");
    let server = receiver(&env);
    let addr = server.local_addr();
    // More slow clients than the receiver has threads: each announces a body and sends none.
    let slow: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: 500\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // Silent connections that send nothing at all.
    let silent: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    assert!(answers_normally(addr, Duration::from_secs(5)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered only after {:?}",
        started.elapsed()
    );
    // The slow ones are timed out with 408, not left open.
    let mut first = slow.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut response = Vec::new();
    let _ = first.read_to_end(&mut response);
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    drop(silent);
    server.stop();
}

#[test]
fn a_flood_of_connections_is_answered_503_past_the_bound() {
    let env = TestEnv::new("hostile_flood");
    let server = receiver(&env);
    let addr = server.local_addr();
    let held: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Past the bound, a connection is refused at once rather than queued for ever.
    let refused = raw_request(
        addr,
        b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        Duration::from_secs(5),
    );
    assert_eq!(refused, 503);
    drop(held);
    env.eventually("the receiver serves again", WAIT, || {
        answers_normally(addr, Duration::from_secs(2))
    });
    server.stop();
}

#[test]
fn garbage_heads_ids_and_bodies_get_4xx_and_no_state() {
    let env = TestEnv::new("hostile_http");
    let server = receiver(&env);
    let addr = server.local_addr();
    let within = Duration::from_secs(5);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            411,
        ),
        (
            format!(
                "POST /webhooks/x/y HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            )
            .into_bytes(),
            431,
        ),
        // A NUL in the ids: refused, not a database error.
        (
            b"POST /webhooks/%00/%00 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            format!(
                "POST /webhooks/{}/n HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}",
                "r".repeat(300)
            )
            .into_bytes(),
            400,
        ),
        (b"GET /webhooks/x/y HTTP/1.1\r\n\r\n".to_vec(), 405),
    ];
    for (request, want) in cases {
        let got = raw_request(addr, &request, within);
        assert_eq!(
            got,
            want,
            "{}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    assert!(answers_normally(addr, within));
    server.stop();
}

#[test]
fn a_webhook_body_postgresql_cannot_store_is_refused_before_it_fires() {
    let env = TestEnv::new("hostile_whbody");
    let server = receiver(&env);
    let addr = server.local_addr();
    let bps = examples();
    let worker = env
        .worker(inc_registry(), bps.clone())
        .public_url(format!("http://{addr}"))
        .threads(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let client = env.client(bps);
    let run = client
        .start_workflow("webhook-approval", Default::default())
        .unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    let path = format!("/webhooks/{run}/review");
    // PostgreSQL's jsonb refuses \u0000; 70 levels of nesting cannot be read back.
    let nul = br#"{"decision": "a\u0000b"}"#;
    assert_eq!(http_post(addr, &path, nul, &[]).0, 400);
    let deep = format!("{}1{}", "[".repeat(70), "]".repeat(70));
    assert_eq!(http_post(addr, &path, deep.as_bytes(), &[]).0, 400);
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    // The webhook did not fire: a correct call resumes the run.
    let (status, reply) = http_post(addr, &path, br#"{"decision": "approve"}"#, &[]);
    assert_eq!(status, 202, "{reply}");
    env.wait_for_status(&run, "completed", WAIT);
    server.stop();
    worker.stop().unwrap();
}

/// Publishes `body` to the test queue with a message id and a header.
fn publish_with_properties(env: &TestEnv, body: &[u8], message_id: &str) {
    use amiquip::{AmqpProperties, AmqpValue, FieldTable, Publish};
    let mut conn = amqp::connect(&amqp_url()).unwrap();
    let channel = conn.open_channel(None).unwrap();
    amqp::declare_job_queue(&channel, &env.queue).unwrap();
    let mut headers = FieldTable::new();
    headers.insert("x-origin".into(), AmqpValue::LongString("test".into()));
    let properties = AmqpProperties::default()
        .with_message_id(message_id.into())
        .with_expiration("600000".into())
        .with_headers(headers);
    channel
        .basic_publish(
            "",
            Publish::with_properties(body, env.queue.clone(), properties),
        )
        .unwrap();
    let _ = conn.close();
}

/// Takes every dead letter: (body, message id, `x-origin`, reason). A dead letter never
/// expires.
fn dead_letters(env: &TestEnv) -> Vec<(String, Option<String>, Option<String>, String)> {
    use amiquip::AmqpValue;
    let mut conn = amqp::connect(&amqp_url()).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let mut out = Vec::new();
    while let Ok(Some(got)) = channel.basic_get(env.dead_queue(), true) {
        let delivery = got.delivery;
        assert_eq!(delivery.properties.expiration(), &None);
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |key: &str| match headers.get(key) {
            Some(AmqpValue::LongString(s)) => Some(s.clone()),
            _ => None,
        };
        out.push((
            String::from_utf8_lossy(&delivery.body).into_owned(),
            delivery.properties.message_id().clone(),
            text("x-origin"),
            text(amqp::DEAD_LETTER_REASON_HEADER).unwrap_or_default(),
        ));
    }
    let _ = conn.close();
    out
}

fn job(run: &str, blueprint: &str, node: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"runId": run, "blueprintId": blueprint, "nodeId": node})).unwrap()
}

#[test]
fn stray_messages_invent_no_state_and_keep_their_properties_when_dead_lettered() {
    let env = TestEnv::new("hostile_stray");
    let (chain, _) = workload("chain5");
    let other = bp(r#"{"id":"other","nodes":[{"id":"a","uses":"inc"}]}"#);
    // A run held live at its first node while the strays of it arrive: a job of a finished
    // run is dropped as a late copy, whatever node it names.
    let held = bp(
        r#"{"id":"held","nodes":[{"id":"gate","uses":"gate"},{"id":"b","uses":"inc"}],
        "edges":[{"source":"gate","target":"b"}]}"#,
    );
    let mut registry = inc_registry();
    let (entered, release) = gated_node(&mut registry, "gate", json!(1));
    let worker = env.start_worker(
        registry,
        vec![chain.clone(), other.clone(), held.clone()],
        2,
    );
    // A job of a run that never existed, of a blueprint nobody has.
    publish_with_properties(&env, &job("nope", "ghost", "n1"), "m-ghost");
    // A timer of a run that never existed.
    let mut timer = json!({"runId": "nope-too", "blueprintId": chain.id(), "nodeId": "n1"});
    timer["timer"] = json!(true);
    publish_with_properties(&env, &serde_json::to_vec(&timer).unwrap(), "m-timer");
    // A job naming a node that is not in the blueprint of a live run, and a job of another
    // blueprint this worker knows, for the same run.
    let run = env.start_run(&held, ContextMap::new());
    entered
        .recv_timeout(WAIT)
        .expect("the held run's first node never started");
    publish_with_properties(&env, &job(&run, held.id(), "no-such-node"), "m-node");
    publish_with_properties(&env, &job(&run, other.id(), "a"), "m-other");
    env.eventually("four dead letters", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 4
    });
    let dead = dead_letters(&env);
    let ids: Vec<Option<String>> = dead.iter().map(|d| d.1.clone()).collect();
    for id in ["m-ghost", "m-timer", "m-node", "m-other"] {
        assert!(ids.contains(&Some(id.to_string())), "{dead:?}");
    }
    for (_, _, origin, reason) in &dead {
        assert_eq!(origin.as_deref(), Some("test"), "{dead:?}");
        assert!(!reason.is_empty());
    }
    // No state was invented, and the live run was not failed.
    assert!(env.store().status("nope").unwrap().is_none());
    assert!(env.store().status("nope-too").unwrap().is_none());
    release.send(()).unwrap();
    env.wait_for_status(&run, "completed", WAIT);
    worker.stop().unwrap();
}

#[test]
fn a_long_run_id_is_dead_lettered_once_with_a_bounded_reason() {
    let env = TestEnv::new("hostile_longid");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 2);
    let long = "r".repeat(200_000);
    env.publish_raw(&job(&long, chain.id(), "n1"));
    env.eventually("the long id is dead-lettered", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 1
    });
    let dead = dead_letters(&env);
    assert_eq!(dead.len(), 1);
    let reason = &dead[0].3;
    assert!(reason.len() <= 1024, "{} bytes", reason.len());
    assert!(reason.contains("runId"), "{reason}");
    // The worker kept its connection: a normal run goes through at once.
    let started = Instant::now();
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(env.queue_depth(&env.dead_queue()), 0);
    worker.stop().unwrap();
}

#[test]
fn an_oversized_message_is_dead_lettered_unread() {
    let env = TestEnv::new("hostile_big");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 2);
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    // A well-formed job of a real run, padded past the message limit.
    let mut big = json!({"runId": run, "blueprintId": chain.id(), "nodeId": "n1"});
    big["pad"] = json!("x".repeat(9 * 1024 * 1024));
    env.publish_raw(&serde_json::to_vec(&big).unwrap());
    env.eventually("the big message is dead-lettered", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 1
    });
    let dead = dead_letters(&env);
    assert!(dead[0].3.contains("bytes long"), "{}", dead[0].3);
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    worker.stop().unwrap();
}

#[test]
fn a_node_output_postgresql_cannot_store_fails_the_run_at_once() {
    let env = TestEnv::new("hostile_nul");
    let b = bp(r#"{"id":"nul","nodes":[
        {"id":"emit","uses":"exec","params":{"shell":"printf '{\"output\": \"a\\\\u0000b\"}'"}},
        {"id":"after","uses":"inc"}],
        "edges":[{"source":"emit","target":"after"}]}"#);
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![b.clone(), chain.clone()], 2);
    let started = Instant::now();
    let run = env.start_run(&b, ContextMap::new());
    let row = env.wait_for_status(&run, "failed", WAIT);
    let reason = row.result.unwrap()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("\\u0000"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(env.queue_depth(&env.dead_queue()), 0);
    // Nothing of the node was written.
    assert!(!env.context(&run).contains_key("_outputs.emit"));
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    worker.stop().unwrap();
}

#[test]
fn a_start_context_that_cannot_be_stored_is_refused_and_nothing_is_written() {
    let env = TestEnv::new("hostile_ctx");
    let (chain, _) = workload("chain5");
    let client = env.client(vec![chain.clone()]);
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    for bad in [json!({"deep": deep}), json!({"nul": "a\u{0}b"})] {
        let err = client.start_workflow(chain.id(), ctx(bad)).unwrap_err();
        assert!(err.is_refusal(), "{err}");
        assert!(err.to_string().contains("cannot be stored"), "{err}");
    }
    let runs = env.count_rows(&env.tables.contexts);
    assert_eq!(runs, 0);
    // A run id that cannot be used.
    for bad in ["", "a\u{0}b", &"r".repeat(300)] {
        let err = client
            .start_workflow_with_id(chain.id(), bad, ContextMap::new())
            .unwrap_err();
        assert!(err.to_string().contains("invalid run id"), "{err}");
    }
}

#[test]
fn a_start_with_the_caller_s_run_id_may_be_retried() {
    let env = TestEnv::new("hostile_retry");
    let (chain, expected) = workload("chain5");
    let client = env.client(vec![chain.clone()]);
    // The first try reaches PostgreSQL but not RabbitMQ.
    let broken = flowcraft_rabbitmq::Client::with_options(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        env.pg.clone(),
        env.redis.clone(),
        env.tables.clone(),
        &env.queue,
        &env.prefix,
    )
    .unwrap()
    .with_blueprints([chain.clone()]);
    let err = broken
        .start_workflow_with_id(chain.id(), "my-run-1", ContextMap::new())
        .unwrap_err();
    assert!(
        matches!(err, flowcraft_rabbitmq::Error::StartNotQueued { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("reconciler"), "{err}");
    // The run is marked for the reconciler's next pass: stalled since long ago.
    let stalled = env
        .store()
        .stalled_runs(Duration::from_secs(3600), 10)
        .unwrap();
    assert_eq!(stalled, vec!["my-run-1".to_string()]);
    // The caller retries with the same id: the run starts once and completes.
    client
        .start_workflow_with_id(chain.id(), "my-run-1", ContextMap::new())
        .unwrap();
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 2);
    let row = env.wait_for_status("my-run-1", "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    for (node, value) in expected.as_object().unwrap() {
        assert_eq!(&context[format!("_outputs.{node}")], value, "{node}");
    }
    // Retrying after it completed changes nothing.
    client
        .start_workflow_with_id(chain.id(), "my-run-1", ContextMap::new())
        .unwrap();
    assert_eq!(
        env.store().status("my-run-1").unwrap().unwrap().status,
        "completed"
    );
    // Another blueprint's run id is refused.
    let other = bp(r#"{"id":"other","nodes":[{"id":"a","uses":"inc"}]}"#);
    let err = env
        .client(vec![other.clone()])
        .start_workflow_with_id("other", "my-run-1", ContextMap::new())
        .unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    worker.stop().unwrap();
}

/// Random job-shaped and shapeless messages: whatever they hold, the worker creates no run,
/// settles every one (the queue drains) and keeps serving a normal run.
#[test]
fn random_messages_never_invent_runs_or_stop_the_worker() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let env = TestEnv::new("hostile_fuzz");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 2);
    let id = prop_oneof![
        Just("n1".to_string()),
        Just(chain.id().to_string()),
        "[a-z0-9-]{0,12}",
        "\\PC{0,20}",
        "[\\x00-\\x1f]{1,4}",
        (300usize..600).prop_map(|n| "x".repeat(n)),
    ];
    let job = (
        id.clone(),
        id.clone(),
        id,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u64), 0u64..5, Just(u64::from(u32::MAX))],
    )
        .prop_map(
            |(run, blueprint, node, timer, wake, recovered, iteration)| {
                serde_json::to_vec(
                    &json!({"runId": run, "blueprintId": blueprint, "nodeId": node,
                "timer": timer, "wake": wake, "recovered": recovered, "iteration": iteration}),
                )
                .unwrap()
            },
        );
    let event = ("\\PC{0,30}", any::<i64>()).prop_map(|(name, n)| {
        serde_json::to_vec(&json!({"event": name, "payload": {"n": n}})).unwrap()
    });
    let body = prop_oneof![job, event, proptest::collection::vec(any::<u8>(), 0..200),];
    let mut runner = TestRunner::deterministic();
    for _ in 0..60 {
        let message = body.new_tree(&mut runner).unwrap().current();
        env.publish_raw(&message);
    }
    env.eventually("every message is settled", WAIT, || {
        env.queue_depth(&env.queue) == 0
    });
    let run = env.start_run(&chain, ContextMap::new());
    env.wait_for_status(&run, "completed", WAIT);
    let statuses = env.count_rows(&env.tables.statuses);
    assert_eq!(statuses, 1, "only the normal run has a status row");
    worker.stop().unwrap();
}

/// Random bytes at the webhook receiver: each connection gets an answer or is closed, and
/// the receiver keeps answering well-formed calls.
#[test]
fn random_bytes_at_the_receiver_never_stop_it() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let env = TestEnv::new("hostile_fuzzhttp");
    let server = receiver(&env);
    let addr = server.local_addr();
    let request = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        ("[A-Z]{0,8}", "\\PC{0,40}", "[0-9]{0,25}", "\\PC{0,60}").prop_map(
            |(method, path, length, body)| format!(
                "{method} {path} HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{body}"
            )
            .into_bytes()
        ),
    ];
    let mut runner = TestRunner::deterministic();
    for _ in 0..100 {
        let bytes = request.new_tree(&mut runner).unwrap().current();
        // Sent whole (the write side closed): an answer or a closed connection, at once.
        let Ok(mut stream) = TcpStream::connect(addr) else {
            panic!("the receiver stopped accepting");
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    }
    assert!(answers_normally(addr, Duration::from_secs(5)));
    server.stop();
}

#[test]
fn a_node_the_run_s_own_records_name_but_the_blueprint_lacks_fails_the_run() {
    let env = TestEnv::new("hostile_recovered");
    let waits = bp(r#"{"id":"waits","nodes":[{"id":"w","uses":"wait"}]}"#);
    let worker = env.start_worker(inc_registry(), vec![waits.clone()], 2);
    let run = env.start_run(&waits, ContextMap::new());
    env.wait_for_status(&run, "awaiting", WAIT);
    // The reconciler's copy names a node the blueprint lacks: the run cannot go on.
    let mut recovered = json!({"runId": run, "blueprintId": "waits", "nodeId": "gone"});
    recovered["recovered"] = json!(true);
    env.publish_raw(&serde_json::to_vec(&recovered).unwrap());
    let row = env.wait_for_status(&run, "failed", WAIT);
    let reason = row.result.unwrap()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("node 'gone' is not in blueprint 'waits'"),
        "{reason}"
    );
    assert_eq!(env.queue_depth(&env.dead_queue()), 0);
    worker.stop().unwrap();
}
