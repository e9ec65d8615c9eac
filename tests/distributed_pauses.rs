//! Human in the loop, durable timers, webhooks, subflows, batches and loops in the
//! distributed runtime, against the real services.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowcraft_rabbitmq::node::ContextMap;
use flowcraft_rabbitmq::webhook::sign;
use flowcraft_rabbitmq::{NodeError, NodeRegistry, NodeResult, WorkerHandle};
use serde_json::json;

type Counts = Arc<Mutex<HashMap<String, usize>>>;

/// Built-ins, `inc`, and a counter of executions per (run, node) for every transform.
fn counting(counts: &Counts) -> NodeRegistry {
    let mut r = inc_registry();
    let seen = counts.clone();
    let transform = r.get("transform").unwrap();
    r.register_fn("transform", move |ctx| {
        *seen
            .lock()
            .unwrap()
            .entry(format!("{}/{}", ctx.run_id, ctx.node_id))
            .or_insert(0) += 1;
        transform.execute(ctx)
    });
    r
}

/// The committed loop iterations of a node, sorted.
fn iterations(context: &serde_json::Value, node: &str) -> Vec<u64> {
    let mut iters: Vec<u64> = context[format!("_node.{node}")]["iters"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i.as_u64()).collect())
        .unwrap_or_default();
    iters.sort();
    iters
}

fn two_workers(
    env: &TestEnv,
    registry: &NodeRegistry,
    bps: &[flowcraft_rabbitmq::Blueprint],
    public_url: &str,
) -> (WorkerHandle, WorkerHandle) {
    let start = || {
        env.worker(registry.clone(), bps.to_vec())
            .threads(2)
            .public_url(public_url)
            .build()
            .unwrap()
            .start()
            .unwrap()
    };
    (start(), start())
}

#[test]
fn a_timer_survives_a_worker_restart() {
    let mut env = TestEnv::new("timer");
    env.extra_queues.push(format!("{}.delay.2000", env.queue));
    let bps = examples();
    let worker = env.start_worker(inc_registry(), bps.clone(), 2);
    let client = env.client(bps.clone());
    let run = client.start_workflow("sleep", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "awaiting", WAIT);
    let details = &row.result.unwrap()["details"];
    assert_eq!(details["type"], json!("sleep"));
    assert!(details["wakeUpAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        env.context(&run)["_awaitingDetails"]["nap"]["durationMs"],
        json!(2000)
    );
    // No worker runs while the timer is due: the wake-up waits in the job queue.
    worker.stop().unwrap();
    env.eventually("the timer moves to the job queue", WAIT, || {
        env.queue_depth(&env.queue) == 1
    });
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    let worker = env.start_worker(inc_registry(), bps, 2);
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(
        context["_outputs.nap"],
        json!("ready"),
        "a sleep passes its input through"
    );
    assert_eq!(context["_outputs.after"], json!("ready, then woke up"));
    worker.stop().unwrap();
}

#[test]
fn resume_is_an_error_when_not_awaiting_and_applies_once() {
    let env = TestEnv::new("resume2");
    let counts: Counts = Default::default();
    let bps = examples();
    let (w1, w2) = two_workers(&env, &counting(&counts), &bps, "http://127.0.0.1:1");
    let client = env.client(bps);
    let run = client
        .start_workflow("approval", ContextMap::new())
        .unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    // Two people resume at once: one wins, the other is told.
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| client.resume_with_action(&run, Some("approve"), json!({"by": "ann"})));
        let b = s.spawn(|| client.resume_with_action(&run, Some("approve"), json!({"by": "bob"})));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let row = env.wait_for_status(&run, "completed", WAIT);
    let by = row.result.unwrap()["context"]["_outputs.approved"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(by == "approved by ann" || by == "approved by bob", "{by}");
    assert_eq!(
        counts.lock().unwrap().get(&format!("{run}/approved")),
        Some(&1)
    );
    let err = client
        .resume_with_action(&run, Some("approve"), json!({}))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is not awaiting (status: completed)"),
        "{err}"
    );
    w1.stop().unwrap();
    w2.stop().unwrap();
}

#[test]
fn a_resume_leaves_an_any_join_that_already_ran_its_first_input() {
    let env = TestEnv::new("resume_any");
    let b = bp(
        r#"{"id":"resume-any","nodes":[{"id":"s","uses":"inc"},{"id":"fast","uses":"inc"},
        {"id":"w","uses":"wait"},{"id":"j","uses":"inc","config":{"joinStrategy":"any"}}],
        "edges":[{"source":"s","target":"fast"},{"source":"s","target":"w"},
        {"source":"fast","target":"j"},{"source":"w","target":"j"}]}"#,
    );
    let worker = env.start_worker(inc_registry(), vec![b.clone()], 2);
    let client = env.client(vec![b]);
    let run = client
        .start_workflow("resume-any", ContextMap::new())
        .unwrap();
    env.eventually("the join runs on the fast branch", WAIT, || {
        env.context(&run).contains_key("_outputs.j")
    });
    env.wait_for_status(&run, "awaiting", WAIT);
    client.resume_with_action(&run, None, json!(100)).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.w"], json!(100));
    // `fast` returned 2: the join ran on it, and the resumed branch changed neither.
    assert_eq!(context["_inputs.j"], json!(2), "{context}");
    assert_eq!(context["_outputs.j"], json!(3), "{context}");
    worker.stop().unwrap();
}

#[test]
fn the_reconciler_rearms_a_lost_timer_once_it_is_overdue_and_leaves_others_alone() {
    let mut env = TestEnv::new("lost_timer");
    let (lost_queue, kept_queue) = (
        format!("{}.delay.3000", env.queue),
        format!("{}.delay.2500", env.queue),
    );
    env.extra_queues.push(lost_queue.clone());
    env.extra_queues.push(kept_queue.clone());
    let nap = |id: &str, ms: u64| {
        bp(&format!(
            r#"{{"id":"{id}","nodes":[{{"id":"s","uses":"inc"}},
            {{"id":"nap","uses":"sleep","params":{{"duration":{ms}}}}},{{"id":"after","uses":"inc"}}],
            "edges":[{{"source":"s","target":"nap"}},{{"source":"nap","target":"after"}}]}}"#
        ))
    };
    let bps = vec![nap("lost", 3000), nap("kept", 2500)];
    let overdue = Duration::from_secs(2);
    let (reconciler, handle) = env.reconciling_worker(inc_registry(), bps.clone(), 2, overdue);
    let client = env.client(bps);
    let lost = client.start_workflow("lost", ContextMap::new()).unwrap();
    let kept = client.start_workflow("kept", ContextMap::new()).unwrap();
    env.wait_for_status(&lost, "awaiting", WAIT);
    env.eventually("the timer is armed", WAIT, || {
        env.queue_depth(&lost_queue) == 1
    });
    // One timer is lost, as when an operator purges its queue.
    assert_eq!(env.purge_queue(&lost_queue), 1);
    let wake_at = env.context(&lost)["_awaitingDetails"]["nap"]["wakeUpAtMs"]
        .as_u64()
        .unwrap();
    let mut woken = 0;
    env.eventually("both runs complete", Duration::from_secs(30), || {
        let stats = reconciler.run().unwrap();
        assert_eq!(stats.failed_runs, 0, "{stats:?}");
        if stats.woken_runs > 0 {
            let now = flowcraft_rabbitmq::testing::nodes::now_ms();
            assert!(
                now >= wake_at + 2_000,
                "woken {} ms after its wake-up time, before it was overdue",
                now.saturating_sub(wake_at)
            );
        }
        woken += stats.woken_runs;
        [&lost, &kept]
            .iter()
            .all(|r| env.store().status(r).unwrap().unwrap().status == "completed")
    });
    assert_eq!(woken, 1, "the lost timer once; the kept one never");
    for run in [&lost, &kept] {
        let row = env.wait_for_status(run, "completed", WAIT);
        // `nap` passes its input (1) through.
        assert_eq!(row.result.unwrap()["context"]["_outputs.after"], json!(2));
    }
    handle.stop().unwrap();
}

#[test]
fn the_reconciler_renotifies_or_restarts_the_child_of_an_awaiting_subflow() {
    let env = TestEnv::new("lost_child");
    let kid = bp(
        r#"{"id":"kid","nodes":[{"id":"k1","uses":"inc"},{"id":"hold","uses":"wait"},
        {"id":"k2","uses":"inc"}],
        "edges":[{"source":"k1","target":"hold"},{"source":"hold","target":"k2"}]}"#,
    );
    let parent = bp(
        r#"{"id":"parent","nodes":[{"id":"child","uses":"subflow","params":{"blueprintId":"kid"}},
        {"id":"after","uses":"inc"}],"edges":[{"source":"child","target":"after"}]}"#,
    );
    let bps = vec![kid, parent];
    let (reconciler, handle) =
        env.reconciling_worker(inc_registry(), bps.clone(), 2, Duration::ZERO);
    // One awaiting run per pass: the passes page through the four awaiting runs.
    let reconciler = reconciler.batch_size(1);
    let client = env.client(bps);
    let child_of = |run: &str| -> String {
        env.context(run)["_awaitingDetails"]["child"]["childRunId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (finished, lost, waiting) = (
        client.start_workflow("parent", ContextMap::new()).unwrap(),
        client.start_workflow("parent", ContextMap::new()).unwrap(),
        client.start_workflow("parent", ContextMap::new()).unwrap(),
    );
    for run in [&finished, &lost, &waiting] {
        env.wait_for_status(run, "awaiting", WAIT);
        env.wait_for_status(&child_of(run), "awaiting", WAIT);
    }
    let mut conn = env.pg.get().unwrap();
    // `finished`: its child ended, and the notice to the parent was lost.
    let child = child_of(&finished);
    conn.execute(
        &format!(
            "DELETE FROM {} WHERE run_id = $1 AND key IN ('_awaitingNodeIds', '_awaitingDetails')",
            env.tables.entries()
        ),
        &[&child],
    )
    .unwrap();
    conn.execute(
        &format!(
            "UPDATE {} SET status = 'completed' WHERE run_id = $1",
            env.tables.statuses
        ),
        &[&child],
    )
    .unwrap();
    // `lost`: its child run was never created.
    let lost_child = child_of(&lost);
    for table in [
        &env.tables.contexts,
        &env.tables.entries(),
        &env.tables.statuses,
    ] {
        conn.execute(
            &format!("DELETE FROM {table} WHERE run_id = $1"),
            &[&lost_child],
        )
        .unwrap();
    }
    drop(conn);
    // Awaiting: the three parents and `waiting`'s child. Only `finished` and `lost` have a
    // lost wake-up (`waiting`'s child waits for a person). Five passes of one run each see
    // every one of them.
    let mut woken = 0;
    for _ in 0..5 {
        let stats = reconciler.run().unwrap();
        assert_eq!(stats.failed_runs, 0, "{stats:?}");
        assert!(stats.woken_runs <= 1, "{stats:?}");
        woken += stats.woken_runs;
    }
    assert_eq!(woken, 2);
    let row = env.wait_for_status(&finished, "completed", WAIT);
    assert!(
        row.result.unwrap()["context"]
            .get("_outputs.after")
            .is_some(),
        "the parent went on"
    );
    // The lost child starts again, reaches its wait, and its completion resumes the parent.
    env.wait_for_status(&lost_child, "awaiting", WAIT);
    client
        .resume_with_action(&lost_child, None, json!(null))
        .unwrap();
    env.wait_for_status(&lost, "completed", WAIT);
    assert_eq!(
        env.store().status(&waiting).unwrap().unwrap().status,
        "awaiting"
    );
    handle.stop().unwrap();
}

#[test]
fn webhooks_resume_runs_once_and_the_receiver_rejects_bad_calls() {
    let env = TestEnv::new("webhook");
    let counts: Counts = Default::default();
    let bps = examples();
    let server = env.webhook_receiver(Some("s3cret"), 1024);
    let addr = server.local_addr();
    let (w1, w2) = two_workers(&env, &counting(&counts), &bps, &format!("http://{addr}"));
    let client = env.client(bps);
    let run = client
        .start_workflow("webhook-approval", ContextMap::new())
        .unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    let details = env.context(&run)["_awaitingDetails"]["review"].clone();
    let path = format!("/webhooks/{run}/review");
    assert_eq!(details["url"], json!(format!("http://{addr}{path}")));
    assert_eq!(details["event"], json!(format!("webhook:{run}:review")));

    let body = br#"{"decision": "approve", "by": "finance"}"#;
    let signature = sign("s3cret", body);
    let signed = [
        ("X-Flowcraft-Signature", signature.as_str()),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(
        http_post(addr, "/webhooks/no-such-run/review", body, &signed).0,
        404
    );
    assert_eq!(http_post(addr, "/elsewhere", body, &signed).0, 404);
    assert_eq!(http_post(addr, &path, body, &[]).0, 401, "unsigned");
    assert_eq!(
        http_post(addr, &path, body, &[("X-Flowcraft-Signature", "sha256=00")]).0,
        401,
        "wrong signature"
    );
    let bad_json = b"{not json";
    assert_eq!(
        http_post(
            addr,
            &path,
            bad_json,
            &[("X-Flowcraft-Signature", &sign("s3cret", bad_json))]
        )
        .0,
        400
    );
    let big = vec![b' '; 2000];
    assert_eq!(
        http_post(
            addr,
            &path,
            &big,
            &[("X-Flowcraft-Signature", &sign("s3cret", &big))]
        )
        .0,
        413
    );
    // None of those fired it.
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    let (status, reply) = http_post(addr, &path, body, &signed);
    assert_eq!(status, 202, "{reply}");
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(
        context["_outputs.review"],
        json!({"decision": "approve", "by": "finance"})
    );
    assert_eq!(context["_outputs.approved"], json!("approved: laptop"));
    // A replay after the run resumed.
    assert_eq!(http_post(addr, &path, body, &signed).0, 409);
    assert_eq!(
        counts.lock().unwrap().get(&format!("{run}/approved")),
        Some(&1)
    );
    assert_eq!(
        counts.lock().unwrap().get(&format!("{run}/decide")),
        Some(&1)
    );

    // Escalation: the webhook says escalate, a person approves with `resume`.
    let run = client
        .start_workflow("webhook-approval", ContextMap::new())
        .unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    let body = br#"{"decision": "escalate"}"#;
    let path = format!("/webhooks/{run}/review");
    assert_eq!(
        http_post(
            addr,
            &path,
            body,
            &[("X-Flowcraft-Signature", &sign("s3cret", body))]
        )
        .0,
        202
    );
    env.eventually("the escalation waits", WAIT, || {
        env.context(&run).get("_awaitingNodeIds") == Some(&json!(["escalation"]))
    });
    client
        .resume_with_action(&run, Some("reject"), json!(null))
        .unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.rejected"],
        json!("rejected: laptop")
    );
    server.stop();
    w1.stop().unwrap();
    w2.stop().unwrap();
}

#[test]
fn two_workers_share_timers_and_resumes_and_run_successors_once() {
    let mut env = TestEnv::new("compete");
    env.extra_queues.push(format!("{}.delay.2000", env.queue));
    let counts: Counts = Default::default();
    let bps = examples();
    let (w1, w2) = two_workers(&env, &counting(&counts), &bps, "http://127.0.0.1:1");
    let client = env.client(bps);
    let sleepers: Vec<String> = (0..6)
        .map(|_| client.start_workflow("sleep", ContextMap::new()).unwrap())
        .collect();
    let waiters: Vec<String> = (0..6)
        .map(|_| {
            client
                .start_workflow("approval", ContextMap::new())
                .unwrap()
        })
        .collect();
    for run in &waiters {
        env.wait_for_status(run, "awaiting", WAIT);
        client
            .resume_with_action(run, Some("reject"), json!(null))
            .unwrap();
    }
    for run in sleepers.iter().chain(&waiters) {
        env.wait_for_status(run, "completed", WAIT);
    }
    let counts = counts.lock().unwrap();
    for run in &sleepers {
        assert_eq!(counts.get(&format!("{run}/after")), Some(&1), "{run}");
    }
    for run in &waiters {
        assert_eq!(counts.get(&format!("{run}/rejected")), Some(&1), "{run}");
        assert_eq!(counts.get(&format!("{run}/approved")), None, "{run}");
    }
    w1.stop().unwrap();
    w2.stop().unwrap();
}

#[test]
fn subflows_run_as_child_runs() {
    let env = TestEnv::new("subflow");
    let bps = examples();
    let worker = env.start_worker(inc_registry(), bps.clone(), 2);
    let client = env.client(bps);
    let run = client.start_workflow("subflow", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.tax"], json!(20));
    assert_eq!(context["_outputs.total"], json!(120));
    let child = format!("{run}.tax.0.1");
    let child_row = env
        .store()
        .status(&child)
        .unwrap()
        .expect("the child run exists");
    assert_eq!(child_row.status, "completed");
    assert_eq!(
        child_row.result.unwrap()["context"]["_parent"]["runId"],
        json!(run)
    );
    worker.stop().unwrap();
}

#[test]
fn a_failed_child_is_retried_then_falls_back() {
    let env = TestEnv::new("subfail");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut registry = inc_registry();
    registry.register_fn("flaky", move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(NodeError::fatal("first child run breaks"))
        } else {
            Ok(NodeResult::output(json!("second time lucky")))
        }
    });
    registry.register_fn("always_broken", |_| Err(NodeError::fatal("never works")));
    let child_ok_second = bp(r#"{"id":"child1","nodes":[{"id":"x","uses":"flaky"}]}"#);
    let child_broken = bp(r#"{"id":"child2","nodes":[{"id":"x","uses":"always_broken"}]}"#);
    let retrying = bp(
        r#"{"id":"p1","nodes":[{"id":"sub","uses":"subflow","params":{"blueprintId":"child1"},
        "config":{"maxRetries":2}},{"id":"next","uses":"inc"}],"edges":[{"source":"sub","target":"next"}]}"#,
    );
    let falling_back = bp(
        r#"{"id":"p2","nodes":[{"id":"sub","uses":"subflow","params":{"blueprintId":"child2"},
        "config":{"fallback":"fb"}},{"id":"fb","uses":"transform","params":{"expression":"'fallback after: ' + context._catch_error.message"}},
        {"id":"next","uses":"transform","params":{"expression":"input"}},
        {"id":"after_fb","uses":"transform","params":{"expression":"'fallback edge'"}}],
        "edges":[{"source":"sub","target":"next"},{"source":"fb","target":"after_fb"}]}"#,
    );
    let failing = bp(
        r#"{"id":"p3","nodes":[{"id":"sub","uses":"subflow","params":{"blueprintId":"child2"}}]}"#,
    );
    let all = vec![
        child_ok_second,
        child_broken,
        retrying,
        falling_back,
        failing,
    ];
    let worker = env.start_worker(registry, all.clone(), 2);
    let client = env.client(all);

    let run = client.start_workflow("p1", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.sub"],
        json!("second time lucky")
    );
    assert_eq!(
        env.store()
            .status(&format!("{run}.sub.0.1"))
            .unwrap()
            .unwrap()
            .status,
        "failed"
    );

    let run = client.start_workflow("p2", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = row.result.unwrap()["context"].clone();
    // As in the in-process runner: the fallback's output stands for the node and under its
    // own id, and the fallback's own edges are taken too.
    assert_eq!(context["_outputs.fb"], context["_outputs.sub"]);
    assert_eq!(context["_outputs.after_fb"], json!("fallback edge"));
    let next = context["_outputs.next"].as_str().unwrap().to_string();
    assert!(
        next.starts_with("fallback after: subflow 'child2'") && next.contains("never works"),
        "{next}"
    );

    let run = client.start_workflow("p3", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "failed", WAIT);
    let reason = row.result.unwrap()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("node 'sub' failed: subflow 'child2'") && reason.contains("never works"),
        "{reason}"
    );
    worker.stop().unwrap();
}

#[test]
fn a_thousand_item_batch_gathers_in_order() {
    let env = TestEnv::new("batch");
    let b = bp(
        r#"{"id":"big","nodes":[{"id":"s","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"g"}},
        {"id":"g","uses":"batch-gather","params":{"outputKey":"all"}}],"edges":[{"source":"s","target":"g"}]}"#,
    );
    let worker = env.start_worker(inc_registry(), vec![b.clone()], 4);
    let items: Vec<i64> = (0..1000).collect();
    let run = env.start_run(&b, ctx(json!({"_inputs.s": items})));
    let row = env.wait_for_status(&run, "completed", Duration::from_secs(120));
    let expected: Vec<i64> = (1..=1000).collect();
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["all"], json!(expected));
    assert_eq!(context["_outputs.g"], json!(expected));
    worker.stop().unwrap();
}

#[test]
fn loops_run_each_iteration_and_stop_at_the_limit() {
    let env = TestEnv::new("loops");
    let bps = examples();
    let forever = bp(
        r#"{"id":"forever","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"inc"},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"true"}}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},
        {"source":"ctl","target":"body","action":"continue"}]}"#,
    );
    let mut all = bps.clone();
    all.push(forever);
    let worker = env
        .worker(inc_registry(), all.clone())
        .threads(2)
        .max_iterations(20)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let client = env.client(all);
    let run = client.start_workflow("loop", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.body"], json!(3));
    assert_eq!(context["_outputs.done"], json!("counted to 3"));
    assert_eq!(
        iterations(context, "body"),
        vec![0, 1, 2],
        "three iterations of the body"
    );
    let run = client.start_workflow("forever", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "failed", WAIT);
    assert!(row.result.unwrap()["reason"]
        .as_str()
        .unwrap()
        .contains("iteration limit"));
    worker.stop().unwrap();
}

#[test]
fn batch_example_runs_distributed() {
    let env = TestEnv::new("batchex");
    let bps = examples();
    let worker = env.start_worker(inc_registry(), bps.clone(), 2);
    let run = env
        .client(bps)
        .start_workflow("batch", ContextMap::new())
        .unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["squares"],
        json!([1, 4, 9, 16])
    );
    worker.stop().unwrap();
}

#[test]
fn a_wait_inside_a_loop_is_resumed_once_per_iteration() {
    let mut env = TestEnv::new("waitloop");
    // The next iteration of `ask` may arrive while the previous one is still awaited: it is
    // deferred through the 1 s delay queue.
    env.extra_queues.push(format!("{}.delay.1000", env.queue));
    let b = bp(
        r#"{"id":"wl","nodes":[{"id":"init","uses":"inc"},{"id":"ask","uses":"wait"},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.ask < 3"}},
        {"id":"done","uses":"transform","inputs":"ask","params":{"expression":"'stopped at ' + input"}}],
        "edges":[{"source":"init","target":"ask"},{"source":"ask","target":"ctl"},
        {"source":"ctl","target":"ask","action":"continue"},{"source":"ctl","target":"done","action":"break"}]}"#,
    );
    let worker = env.start_worker(inc_registry(), vec![b.clone()], 2);
    let client = env.client(vec![b]);
    let run = client.start_workflow("wl", ContextMap::new()).unwrap();
    for answer in 1..=3u64 {
        env.eventually(&format!("iteration {answer} waits"), WAIT, || {
            env.store()
                .status(&run)
                .unwrap()
                .is_some_and(|r| r.status == "awaiting")
                && env
                    .context(&run)
                    .get("_awaitingDetails")
                    .and_then(|d| d["ask"]["iteration"].as_u64())
                    == Some(answer - 1)
        });
        client
            .resume_with_action(&run, None, json!(answer))
            .unwrap();
    }
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.done"], json!("stopped at 3"));
    assert_eq!(iterations(context, "ask"), vec![0, 1, 2]);
    worker.stop().unwrap();
}

#[test]
fn parallel_pauses_resume_independently_and_side_branches_of_loops_repeat() {
    let env = TestEnv::new("parallel");
    let two_waits = bp(
        r#"{"id":"two","nodes":[{"id":"s","uses":"inc"},{"id":"w1","uses":"wait"},{"id":"w2","uses":"wait"},
        {"id":"after1","uses":"inc"},{"id":"after2","uses":"inc"}],
        "edges":[{"source":"s","target":"w1"},{"source":"s","target":"w2"},
        {"source":"w1","target":"after1"},{"source":"w2","target":"after2"}]}"#,
    );
    let side = bp(
        r#"{"id":"side","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"transform","params":{"expression":"(context['_outputs.body'] ?? 0) + 1"}},
        {"id":"log","uses":"inc"},{"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.body < 3"}}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},{"source":"body","target":"log"},
        {"source":"ctl","target":"body","action":"continue"}]}"#,
    );
    let all = vec![two_waits, side];
    let worker = env.start_worker(inc_registry(), all.clone(), 2);
    let client = env.client(all);

    let run = client.start_workflow("two", ContextMap::new()).unwrap();
    env.eventually("both branches wait", WAIT, || {
        env.context(&run)
            .get("_awaitingNodeIds")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            == Some(2)
    });
    client
        .resume_nodes(&run, Some(&["w1".to_string()]), None, json!(10))
        .unwrap();
    env.eventually("after1 ran", WAIT, || {
        env.context(&run).contains_key("_outputs.after1")
    });
    let context = env.context(&run);
    assert_eq!(
        context["_awaitingNodeIds"],
        json!(["w2"]),
        "the other pause is still awaited"
    );
    assert!(context["_awaitingDetails"].get("w2").is_some());
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    client
        .resume_nodes(&run, Some(&["w2".to_string()]), None, json!(20))
        .unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(
        (
            context["_outputs.after1"].clone(),
            context["_outputs.after2"].clone()
        ),
        (json!(11), json!(21))
    );
    assert!(context.get("_awaitingNodeIds").is_none());

    let run = client.start_workflow("side", ContextMap::new()).unwrap();
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(iterations(context, "body"), vec![0, 1, 2]);
    assert_eq!(
        iterations(context, "log"),
        vec![0, 1, 2],
        "a side branch of the loop body runs once per iteration"
    );
    worker.stop().unwrap();
}

#[test]
fn a_join_of_a_loop_exit_and_a_parallel_branch_fires_once() {
    let env = TestEnv::new("loopjoin");
    let counts: Counts = Default::default();
    let b = bp(
        r#"{"id":"lj","nodes":[{"id":"init","uses":"transform","params":{"expression":"0"}},
        {"id":"body","uses":"transform","params":{"expression":"(context['_outputs.body'] ?? 0) + 1"}},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.body < 3"}},
        {"id":"other","uses":"transform","params":{"expression":"'side'"}},
        {"id":"done","uses":"transform","inputs":{"b":"body","o":"other"},"params":{"expression":"input.o + ' ' + input.b"}},
        {"id":"after","uses":"transform","params":{"expression":"input + '!'"}}],
        "edges":[{"source":"init","target":"body"},{"source":"init","target":"other"},{"source":"body","target":"ctl"},
        {"source":"ctl","target":"body","action":"continue"},{"source":"ctl","target":"done","action":"break"},
        {"source":"other","target":"done"},{"source":"done","target":"after"}]}"#,
    );
    let worker = env.start_worker(counting(&counts), vec![b.clone()], 3);
    let run = env.start_run(&b, ContextMap::new());
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.done"], json!("side 3"));
    assert_eq!(context["_outputs.after"], json!("side 3!"));
    let counts = counts.lock().unwrap();
    assert_eq!(counts.get(&format!("{run}/done")), Some(&1));
    assert_eq!(counts.get(&format!("{run}/body")), Some(&3));
    worker.stop().unwrap();
}

#[test]
fn two_loops_meeting_at_a_join_fire_it_once() {
    let env = TestEnv::new("twoloops");
    let counts: Counts = Default::default();
    let b = bp(
        r#"{"id":"tl","nodes":[{"id":"s","uses":"transform","params":{"expression":"0"}},
        {"id":"a","uses":"transform","params":{"expression":"(context['_outputs.a'] ?? 0) + 1"}},
        {"id":"ca","uses":"loop-controller","params":{"condition":"_outputs.a < 2"}},
        {"id":"b","uses":"transform","params":{"expression":"(context['_outputs.b'] ?? 0) + 1"}},
        {"id":"cb","uses":"loop-controller","params":{"condition":"_outputs.b < 4"}},
        {"id":"ea","uses":"transform","params":{"expression":"'a done'"}},
        {"id":"eb","uses":"transform","params":{"expression":"'b done'"}},
        {"id":"j","uses":"transform","inputs":{"x":"ea","y":"eb"},"params":{"expression":"input.x + ', ' + input.y"}}],
        "edges":[{"source":"s","target":"a"},{"source":"s","target":"b"},
        {"source":"a","target":"ca"},{"source":"ca","target":"a","action":"continue"},{"source":"ca","target":"ea","action":"break"},
        {"source":"b","target":"cb"},{"source":"cb","target":"b","action":"continue"},{"source":"cb","target":"eb","action":"break"},
        {"source":"ea","target":"j"},{"source":"eb","target":"j"}]}"#,
    );
    let worker = env.start_worker(counting(&counts), vec![b.clone()], 3);
    let run = env.start_run(&b, ContextMap::new());
    let row = env.wait_for_status(&run, "completed", WAIT);
    let context = &row.result.unwrap()["context"];
    assert_eq!(context["_outputs.j"], json!("a done, b done"));
    assert_eq!(counts.lock().unwrap().get(&format!("{run}/j")), Some(&1));
    let local = flowcraft_rabbitmq::LocalRuntime::new(inc_registry()).run(&b, ContextMap::new());
    assert_eq!(local.context["_outputs.j"], json!("a done, b done"));
    worker.stop().unwrap();
}

#[test]
fn a_late_worker_of_an_earlier_larger_round_changes_nothing() {
    let env = TestEnv::new("late_worker");
    // Round 0 has three items, round 1 two; then the run waits.
    let shrinking = bp(r#"{"id":"shrink","nodes":[{"id":"items","uses":"transform",
        "params":{"expression":"context['_outputs.gather'] && [1, 2] || [1, 2, 3]"}},
        {"id":"scatter","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"gather"}},
        {"id":"gather","uses":"batch-gather"},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.gather.length > 2"}},
        {"id":"hold","uses":"wait"}],
        "edges":[{"source":"items","target":"scatter"},{"source":"scatter","target":"gather"},
        {"source":"gather","target":"ctl"},{"source":"ctl","target":"items","action":"continue"},
        {"source":"ctl","target":"hold","action":"break"}],
        "metadata":{"cycleEntryPoints":["items"]}}"#);
    let marker = bp(r#"{"id":"marker","nodes":[{"id":"m","uses":"inc"}]}"#);
    let bps = vec![shrinking, marker];
    let worker = env
        .worker(inc_registry(), bps.clone())
        .threads(1)
        .prefetch(1)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let client = env.client(bps);
    let run = client.start_workflow("shrink", ContextMap::new()).unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    assert_eq!(env.context(&run)["_outputs.gather"], json!([2, 3]));
    // A late copy of round 0's third worker, which round 1 does not have.
    env.publish_raw(
        json!({"runId": run, "blueprintId": "shrink", "nodeId": "gather#2"})
            .to_string()
            .as_bytes(),
    );
    // One thread, one delivery at a time, in order: once a later run completes, the late
    // copy has been handled.
    let later = client.start_workflow("marker", ContextMap::new()).unwrap();
    env.wait_for_status(&later, "completed", WAIT);
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    worker.stop().unwrap();
}

#[test]
fn cancel_stops_the_running_node_and_cascades_to_subflow_children() {
    let env = TestEnv::new("cancel");
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(4);
    let (stopped_tx, stopped_rx) = crossbeam_channel::bounded::<bool>(4);
    let mut registry = inc_registry();
    registry.register_fn("spin", move |ctx| {
        let _ = entered_tx.send(());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ctx.cancel.is_cancelled() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = stopped_tx.send(ctx.cancel.is_cancelled());
        Ok(NodeResult::output(json!("spun")))
    });
    let spin = bp(
        r#"{"id":"spin","nodes":[{"id":"s","uses":"spin"},{"id":"after","uses":"inc"}],
        "edges":[{"source":"s","target":"after"}]}"#,
    );
    let child = bp(r#"{"id":"child","nodes":[{"id":"w","uses":"wait"}]}"#);
    let parent = bp(
        r#"{"id":"parent","nodes":[{"id":"sub","uses":"subflow","params":{"blueprintId":"child"}}]}"#,
    );
    let blueprints = vec![spin.clone(), child, parent];
    let (worker, addr) =
        TestEnv::start_serving_metrics(env.worker(registry, blueprints.clone()).threads(1));
    let client = env.client(blueprints);

    // A running node sees its flag raised, and the run ends cancelled: once the node's
    // delivery and its successor's are settled, the successor has not run.
    let run = client.start_workflow("spin", ContextMap::new()).unwrap();
    entered_rx.recv_timeout(WAIT).expect("the node started");
    client.cancel(&run).unwrap();
    assert_eq!(
        stopped_rx.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "the node saw the cancel"
    );
    env.eventually("both deliveries are settled", WAIT, || {
        http_get(addr, "/metrics", &[])
            .1
            .contains("flowcraft_jobs_total{outcome=\"ack\"} 2")
    });
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "cancelled"
    );
    let context = env.context(&run);
    assert!(context.contains_key("_outputs.s"), "{context:?}");
    assert!(!context.contains_key("_outputs.after"), "{context:?}");

    // A parent's cancel reaches its subflow child.
    let run = client.start_workflow("parent", ContextMap::new()).unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    let child_run = env.context(&run)["_awaitingDetails"]["sub"]["childRunId"]
        .as_str()
        .unwrap()
        .to_string();
    env.wait_for_status(&child_run, "awaiting", WAIT);
    client.cancel(&run).unwrap();
    assert_eq!(
        env.store().status(&child_run).unwrap().unwrap().status,
        "cancelled"
    );
    worker.stop().unwrap();
}
