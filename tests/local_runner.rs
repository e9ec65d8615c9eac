//! The in-process runner, through the public API only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod common;

use common::{bp, ctx, flowcraft_counter_loop, inc_registry, workload};
use flowcraft_rabbitmq::node::ContextMap;

use flowcraft_rabbitmq::{LocalRuntime, NodeError, NodeResult, RunStatus};
use serde_json::{json, Value};

#[test]
fn bench_workloads_give_their_expected_outputs() {
    let runtime = LocalRuntime::new(inc_registry());
    for name in ["chain5", "diamond8"] {
        let (b, expected) = workload(name);
        let result = runtime.run(&b, ContextMap::new());
        assert_eq!(
            result.status,
            RunStatus::Completed,
            "{name}: {:?}",
            result.errors
        );
        for (node, value) in expected.as_object().unwrap() {
            assert_eq!(
                result.context[&format!("_outputs.{node}")],
                *value,
                "{name}.{node}"
            );
        }
    }
}

#[test]
fn all_join_runs_once_after_every_branch() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut reg = inc_registry();
    reg.register_fn("count", move |ctx| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(NodeResult::output(json!([
            ctx.context.get("_outputs.a"),
            ctx.context.get("_outputs.b")
        ])))
    });
    let b = bp(
        r#"{"id":"j","nodes":[{"id":"s","uses":"inc"},{"id":"a","uses":"inc"},{"id":"b","uses":"inc"},
        {"id":"j","uses":"count"}],"edges":[{"source":"s","target":"a"},{"source":"s","target":"b"},
        {"source":"a","target":"j"},{"source":"b","target":"j"}]}"#,
    );
    let result = LocalRuntime::builder(reg)
        .threads(2)
        .build()
        .run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(result.context["_outputs.j"], json!([2, 2]));
}

#[test]
fn a_late_branch_leaves_an_any_join_that_already_ran_untouched() {
    // `slow` finishes only after the join ran on `fast`'s answer and that run was recorded
    // (the signal comes from `after`, which follows the join); its arrival must change
    // neither the join's input nor its output.
    let (ran, join_ran) = std::sync::mpsc::channel::<()>();
    let join_ran = std::sync::Mutex::new(join_ran);
    let ran = std::sync::Mutex::new(ran);
    let mut reg = inc_registry();
    reg.register_fn("answer", |ctx| Ok(NodeResult::output(json!(ctx.node_id))));
    reg.register_fn("slow_answer", move |ctx| {
        let waited = join_ran
            .lock()
            .map_err(|e| NodeError::new(e.to_string()))?
            .recv_timeout(std::time::Duration::from_secs(10));
        waited.map_err(|e| NodeError::new(format!("the join never ran: {e}")))?;
        Ok(NodeResult::output(json!(ctx.node_id)))
    });
    reg.register_fn("first", |ctx| Ok(NodeResult::output(ctx.input.clone())));
    reg.register_fn("signal", move |ctx| {
        let _ = ran.lock().map(|s| s.send(()));
        Ok(NodeResult::output(ctx.input.clone()))
    });
    let b = bp(
        r#"{"id":"late","nodes":[{"id":"s","uses":"inc"},{"id":"fast","uses":"answer"},
        {"id":"slow","uses":"slow_answer"},{"id":"j","uses":"first","config":{"joinStrategy":"any"}},
        {"id":"after","uses":"signal"}],
        "edges":[{"source":"s","target":"fast"},{"source":"s","target":"slow"},
        {"source":"fast","target":"j"},{"source":"slow","target":"j"},{"source":"j","target":"after"}]}"#,
    );
    let result = LocalRuntime::builder(reg)
        .threads(2)
        .build()
        .run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.slow"], json!("slow"));
    assert_eq!(result.context["_outputs.j"], json!("fast"));
    assert_eq!(result.context["_inputs.j"], json!("fast"));
}

#[test]
fn untaken_branches_do_not_hold_the_run_open() {
    let b = bp(
        r#"{"id":"u","nodes":[{"id":"s","uses":"inc"},{"id":"yes","uses":"inc"},{"id":"no","uses":"inc"}],
        "edges":[{"source":"s","target":"yes","condition":"result.output == 1"},
                 {"source":"s","target":"no","condition":"result.output != 1"}]}"#,
    );
    let result = LocalRuntime::new(inc_registry()).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed);
    assert!(result.context.contains_key("_outputs.yes"));
    assert!(!result.context.contains_key("_outputs.no"));
}

#[test]
fn failure_without_fallback_fails_the_run_with_the_reason() {
    let mut reg = inc_registry();
    reg.register_fn("boom", |_| Err(NodeError::new("disk on fire")));
    let b = bp(
        r#"{"id":"f","nodes":[{"id":"a","uses":"boom","config":{"maxRetries":2}},{"id":"b","uses":"inc"}],
        "edges":[{"source":"a","target":"b"}]}"#,
    );
    let result = LocalRuntime::new(reg).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.errors.len(), 1);
    assert_eq!(result.errors[0].node_id, "a");
    assert!(
        result.errors[0].message.contains("disk on fire")
            && result.errors[0].message.contains("2 attempt")
    );
    assert!(!result.context.contains_key("_outputs.b"));
}

#[test]
fn fallback_output_is_recorded_under_both_ids_and_edges_followed() {
    let mut reg = inc_registry();
    reg.register_fn("boom", |_| Err(NodeError::new("nope")));
    reg.register_fn("fb", |_| Ok(NodeResult::output(json!(41))));
    let b = bp(
        r#"{"id":"f","nodes":[{"id":"a","uses":"boom","config":{"fallback":"f"}},{"id":"f","uses":"fb"},
        {"id":"next","uses":"inc"}],"edges":[{"source":"a","target":"next"}]}"#,
    );
    let result = LocalRuntime::new(reg).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.a"], json!(41));
    assert_eq!(result.context["_outputs.f"], json!(41));
    assert_eq!(result.context["_outputs.next"], json!(42));
    assert_eq!(result.context["_catch_error"]["nodeId"], json!("a"));
}

#[test]
fn timeouts_fail_attempts_then_retry() {
    let mut reg = inc_registry();
    reg.register_fn("slow_first", |ctx| {
        if ctx.attempt == 1 {
            while !ctx.cancel.is_cancelled() {
                std::thread::yield_now();
            }
            return Err(NodeError::new("cancelled"));
        }
        Ok(NodeResult::output(json!(ctx.attempt)))
    });
    let b = bp(
        r#"{"id":"t","nodes":[{"id":"a","uses":"slow_first","config":{"timeout":30,"maxRetries":2}}]}"#,
    );
    let result = LocalRuntime::new(reg).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.a"], json!(2));
}

#[test]
fn node_context_writes_are_applied() {
    let mut reg = inc_registry();
    reg.register_fn("writer", |ctx| {
        ctx.context.set("note", json!("hi"));
        ctx.context.delete("drop_me");
        Ok(NodeResult::output(Value::Null))
    });
    let b = bp(r#"{"id":"w","nodes":[{"id":"a","uses":"writer"}]}"#);
    let result = LocalRuntime::new(reg).run(&b, ctx(json!({"drop_me": 1, "keep": 2})));
    assert_eq!(result.context["note"], json!("hi"));
    assert_eq!(result.context["keep"], json!(2));
    assert!(!result.context.contains_key("drop_me"));
    assert_eq!(result.context["blueprintId"], json!("w"));
}

#[test]
fn loops_stop_at_the_iteration_limit() {
    let b = bp(
        r#"{"id":"forever","nodes":[{"id":"init","uses":"inc"},{"id":"body","uses":"inc"},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"true"}}],
        "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},
        {"source":"ctl","target":"body","action":"continue"}]}"#,
    );
    let result = LocalRuntime::builder(inc_registry())
        .max_iterations(25)
        .build()
        .run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Failed);
    assert!(
        result.errors[0].message.contains("iteration limit"),
        "{:?}",
        result.errors
    );
}

#[test]
fn joins_inside_loops_fire_once_per_iteration() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut reg = inc_registry();
    reg.register_fn("tick", move |_| {
        Ok(NodeResult::output(json!(
            seen.fetch_add(1, Ordering::SeqCst) + 1
        )))
    });
    let b = bp(
        r#"{"id":"lj","nodes":[{"id":"init","uses":"inc"},{"id":"fan","uses":"inc"},
        {"id":"l","uses":"inc"},{"id":"r","uses":"inc"},{"id":"join","uses":"tick"},
        {"id":"ctl","uses":"loop-controller","params":{"condition":"_outputs.join < 3"}},
        {"id":"out","uses":"inc"}],
        "edges":[{"source":"init","target":"fan"},{"source":"fan","target":"l"},{"source":"fan","target":"r"},
        {"source":"l","target":"join"},{"source":"r","target":"join"},{"source":"join","target":"ctl"},
        {"source":"ctl","target":"fan","action":"continue"},{"source":"ctl","target":"out","action":"break"}]}"#,
    );
    let result = LocalRuntime::builder(reg)
        .threads(3)
        .build()
        .run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(result.context.contains_key("_outputs.out"));
}

#[test]
fn wait_pauses_and_resume_follows_the_action() {
    let b = bp(
        r#"{"id":"w","nodes":[{"id":"a","uses":"inc"},{"id":"w","uses":"wait"},
        {"id":"yes","uses":"inc"},{"id":"no","uses":"inc"}],
        "edges":[{"source":"a","target":"w"},{"source":"w","target":"yes","action":"approve"},
        {"source":"w","target":"no","action":"reject"}]}"#,
    );
    let runtime = LocalRuntime::new(inc_registry());
    let paused = runtime.run(&b, ContextMap::new());
    assert_eq!(paused.status, RunStatus::Awaiting);
    assert_eq!(paused.context["_awaitingNodeIds"], json!(["w"]));
    assert_eq!(
        paused.context["_awaitingDetails"]["w"]["type"],
        json!("wait")
    );
    let done = runtime.resume(&b, paused.context, Some("approve".into()), json!(10));
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.errors);
    assert_eq!(done.context["_outputs.w"], json!(10));
    assert_eq!(done.context["_outputs.yes"], json!(11));
    assert_eq!(done.context["_resume.action"], json!("approve"));
    assert!(!done.context.contains_key("_outputs.no"));
    assert!(!done.context.contains_key("_awaitingNodeIds"));
}

#[test]
fn sleep_wakes_in_process_and_webhook_pauses() {
    let b = bp(r#"{"id":"s","nodes":[{"id":"start","uses":"inc"},
        {"id":"nap","uses":"sleep","params":{"duration":"50ms"}},
        {"id":"after","uses":"inc"},
        {"id":"hook","uses":"webhook"}],
        "edges":[{"source":"start","target":"nap"},{"source":"nap","target":"after"}]}"#);
    let started = std::time::Instant::now();
    let result = LocalRuntime::new(inc_registry()).run(&b, ContextMap::new());
    assert!(started.elapsed() >= std::time::Duration::from_millis(50));
    // The sleep woke in this process and passed its input on; the webhook still waits.
    assert_eq!(result.status, RunStatus::Awaiting);
    assert_eq!(result.context["_outputs.nap"], json!(1));
    assert_eq!(result.context["_outputs.after"], json!(2));
    assert_eq!(result.context["_awaitingNodeIds"], json!(["hook"]));
    let details = &result.context["_awaitingDetails"];
    assert_eq!(details["hook"]["type"], json!("webhook"));
}

#[test]
fn resume_can_name_one_awaited_node() {
    let b = bp(
        r#"{"id":"two","nodes":[{"id":"a","uses":"wait"},{"id":"b","uses":"wait"},
        {"id":"after-a","uses":"inc"},{"id":"after-b","uses":"inc"}],
        "edges":[{"source":"a","target":"after-a"},{"source":"b","target":"after-b"}]}"#,
    );
    let runtime = LocalRuntime::new(inc_registry());
    let paused = runtime.run(&b, ContextMap::new());
    // The two waits run in parallel: either may pause first.
    let mut awaited: Vec<String> =
        serde_json::from_value(paused.context["_awaitingNodeIds"].clone()).unwrap();
    awaited.sort();
    assert_eq!(awaited, ["a", "b"]);
    let half = runtime.resume_nodes(
        &b,
        paused.context,
        Some(&["b".to_string()]),
        None,
        json!(10),
    );
    assert_eq!(half.status, RunStatus::Awaiting);
    assert_eq!(half.context["_awaitingNodeIds"], json!(["a"]));
    assert!(half.context["_awaitingDetails"].get("a").is_some());
    assert_eq!(half.context["_outputs.after-b"], json!(11));
    let done = runtime.resume_nodes(&b, half.context, None, None, json!(20));
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.errors);
    assert_eq!(done.context["_outputs.after-a"], json!(21));
    assert!(!done.context.contains_key("_awaitingNodeIds"));
}

#[test]
fn batch_of_a_thousand_items_gathers_in_order() {
    let b = bp(
        r#"{"id":"b","nodes":[{"id":"s","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"g"}},
        {"id":"g","uses":"batch-gather","params":{"outputKey":"all"}}],"edges":[{"source":"s","target":"g"}]}"#,
    );
    let items: Vec<i64> = (0..1000).collect();
    let result = LocalRuntime::builder(inc_registry())
        .threads(4)
        .build()
        .run(&b, ctx(json!({"_inputs.s": items})));
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    let expected: Vec<i64> = (1..=1000).collect();
    assert_eq!(result.context["all"], json!(expected));
    assert_eq!(result.context["_outputs.g"], json!(expected));
}

#[test]
fn empty_batch_still_gathers() {
    let b = bp(
        r#"{"id":"b","nodes":[{"id":"s","uses":"batch-scatter","params":{"workerUsesKey":"inc","gatherNodeId":"g"}},
        {"id":"g","uses":"batch-gather"}],"edges":[{"source":"s","target":"g"}]}"#,
    );
    let result = LocalRuntime::new(inc_registry()).run(&b, ctx(json!({"_inputs.s": []})));
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.g"], json!([]));
}

#[test]
fn failed_subflow_fails_the_parent_node_so_its_fallback_runs() {
    let mut reg = inc_registry();
    reg.register_fn("boom", |_| Err(NodeError::new("child broke")));
    let child = bp(r#"{"id":"child","nodes":[{"id":"x","uses":"boom"}]}"#);
    let parent = bp(
        r#"{"id":"parent","nodes":[{"id":"sub","uses":"subflow","params":{"blueprintId":"child"},
        "config":{"fallback":"fb"}},{"id":"fb","uses":"inc"}]}"#,
    );
    let runtime = LocalRuntime::builder(reg).blueprint(child).build();
    let result = runtime.run(&parent, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.sub"], json!(1));
    assert!(result.context["_catch_error"]["message"]
        .as_str()
        .unwrap()
        .contains("child broke"));
}

#[test]
fn subflow_outputs_mapping_sets_parent_keys() {
    let child = bp(r#"{"id":"child","nodes":[{"id":"x","uses":"inc"}]}"#);
    let parent = bp(r#"{"id":"parent","nodes":[{"id":"seed","uses":"inc"},
        {"id":"sub","uses":"subflow","params":{"blueprintId":"child","outputs":{"fromChild":"x"}}}],
        "edges":[{"source":"seed","target":"sub"}]}"#);
    let runtime = LocalRuntime::builder(inc_registry())
        .blueprint(child)
        .build();
    let result = runtime.run(&parent, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    // The unmapped input (seed's output, 1) reaches the child's start node: 1 + 1.
    assert_eq!(result.context["fromChild"], json!(2));
    assert_eq!(result.context["_outputs.sub"]["_outputs.x"], json!(2));
}

#[test]
fn recursive_subflows_are_bounded() {
    let looped = bp(
        r#"{"id":"me","nodes":[{"id":"again","uses":"subflow","params":{"blueprintId":"me"}}]}"#,
    );
    let runtime = LocalRuntime::builder(inc_registry())
        .blueprint(looped.clone())
        .build();
    let result = runtime.run(&looped, ContextMap::new());
    assert_eq!(result.status, RunStatus::Failed);
    assert!(format!("{:?}", result.errors).contains("nest deeper"));
}

#[test]
fn unknown_blueprint_by_id_is_an_error() {
    let runtime = LocalRuntime::new(inc_registry());
    let err = runtime.run_by_id("ghost", ContextMap::new()).unwrap_err();
    assert_eq!(err.to_string(), "unknown blueprint 'ghost'");
}

#[test]
fn an_output_that_cannot_be_stored_fails_its_attempts_and_the_fallback_stands_in() {
    // The same rule as the distributed worker's, so a blueprint means the same in both.
    let mut registry = inc_registry();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    registry.register_fn("nul", move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(NodeResult::output(json!("a\u{0}b")))
    });
    let b = bp(r#"{"id":"nul","nodes":[
        {"id":"bad","uses":"nul","config":{"maxRetries":2,"fallback":"safe"}},
        {"id":"safe","uses":"inc"},
        {"id":"after","uses":"inc"}],
        "edges":[{"source":"bad","target":"after"}]}"#);
    let result = LocalRuntime::new(registry.clone()).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "both attempts ran");
    assert_eq!(result.context["_outputs.bad"], json!(1));
    let message = result.context["_catch_error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("\\u0000"), "{message}");
    // Without a fallback the run fails with the reason.
    let b = bp(r#"{"id":"nul2","nodes":[{"id":"bad","uses":"nul"}]}"#);
    let result = LocalRuntime::new(registry).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Failed);
    assert!(
        result.errors[0].message.contains("cannot be stored"),
        "{:?}",
        result.errors
    );
}

/// Flowcraft stores a node's output under its bare id too, so conditions read
/// `fetch.total`; hyphenated ids read as keys (`get-user.age`).
fn bare_id_blueprint() -> flowcraft_rabbitmq::Blueprint {
    bp(r#"{"id":"bare","nodes":[
        {"id":"fetch","uses":"transform","params":{"expression":"{total: 150}"}},
        {"id":"get-user","uses":"transform","params":{"expression":"{age: 20}"}},
        {"id":"big","uses":"transform","params":{"expression":"'big'"}},
        {"id":"small","uses":"transform","params":{"expression":"'small'"}},
        {"id":"adult","uses":"transform","params":{"expression":"'adult'"}}],
        "edges":[{"source":"fetch","target":"big","condition":"fetch.total > 100"},
                 {"source":"fetch","target":"small","condition":"fetch.total <= 100"},
                 {"source":"get-user","target":"adult","condition":"get-user.age >= 18"}]}"#)
}

#[test]
fn outputs_are_stored_under_the_bare_node_id_too_as_flowcraft_does() {
    let result = LocalRuntime::new(inc_registry()).run(&bare_id_blueprint(), ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["fetch"], json!({"total": 150}));
    assert_eq!(result.context["_outputs.fetch"], json!({"total": 150}));
    assert_eq!(result.context.get("_outputs.big"), Some(&json!("big")));
    assert_eq!(
        result.context.get("_outputs.small"),
        None,
        "the wrong branch ran"
    );
    assert_eq!(result.context.get("_outputs.adult"), Some(&json!("adult")));
}

#[test]
fn awaiting_details_carry_flowcraft_s_reason() {
    let b = bp(r#"{"id":"pauses","nodes":[{"id":"w","uses":"wait"},{"id":"h","uses":"webhook"}]}"#);
    let result = LocalRuntime::new(inc_registry()).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Awaiting);
    let details = &result.context["_awaitingDetails"];
    assert_eq!(details["w"]["reason"], json!("external_event"));
    assert_eq!(details["h"]["reason"], json!("external_event"));
}

#[test]
fn a_local_run_can_be_cancelled_while_a_node_runs() {
    let mut registry = inc_registry();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    registry.register_fn("spin", move |ctx| {
        let _ = entered_tx.try_send(());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !ctx.cancel.is_cancelled() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(NodeResult::output(json!(null)))
    });
    let b = bp(
        r#"{"id":"c","nodes":[{"id":"s","uses":"spin"},{"id":"after","uses":"inc"}],
        "edges":[{"source":"s","target":"after"}]}"#,
    );
    let runtime = LocalRuntime::new(registry);
    let cancel = flowcraft_rabbitmq::node::CancelFlag::new();
    let started = std::time::Instant::now();
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Once the node runs.
            let _ = entered_rx.recv_timeout(std::time::Duration::from_secs(30));
            cancel.cancel();
        });
        runtime.run_cancellable(&b, ContextMap::new(), &cancel)
    });
    assert_eq!(result.status, RunStatus::Cancelled);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(!result.context.contains_key("_outputs.after"));
}

#[test]
fn a_batch_s_chunk_size_bounds_its_workers_in_flight() {
    let mut registry = inc_registry();
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), most.clone());
    registry.register_fn("slow", move |ctx| {
        let inside = n.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(inside, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        n.fetch_sub(1, Ordering::SeqCst);
        Ok(NodeResult::output(json!(
            ctx.input.as_i64().unwrap_or(0) * 2
        )))
    });
    let b = bp(r#"{"id":"chunked","nodes":[
        {"id":"s","uses":"batch-scatter","params":{"workerUsesKey":"slow","gatherNodeId":"g","chunkSize":2}},
        {"id":"g","uses":"batch-gather"}],"edges":[{"source":"s","target":"g"}]}"#);
    let items: Vec<i64> = (0..20).collect();
    let result = LocalRuntime::builder(registry)
        .threads(8)
        .build()
        .run(&b, ctx(json!({"_inputs.s": items})));
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    let expected: Vec<i64> = (0..20).map(|i| i * 2).collect();
    assert_eq!(result.context["_outputs.g"], json!(expected));
    let most = most.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "{most} workers ran at once");
}

#[test]
fn a_transform_reads_flat_context_keys_without_copying_the_context() {
    let b = bp(r#"{"id":"flat","nodes":[
        {"id":"a","uses":"transform","params":{"expression":"{total: 7}"}},
        {"id":"b","uses":"transform","params":{"expression":"[context._outputs.a.total, context['_outputs.a'].total, context.missing ?? 'none', context.items.length]"}}],
        "edges":[{"source":"a","target":"b"}]}"#);
    let result = LocalRuntime::new(inc_registry()).run(&b, ctx(json!({"items": [1, 2, 3]})));
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["_outputs.b"], json!([7, 7, "none", 3]));
}

#[test]
fn a_subflow_whose_child_pauses_pauses_its_parent_until_resumed() {
    let child = bp(r#"{"id":"approval","nodes":[{"id":"ask","uses":"wait"},
        {"id":"decided","uses":"transform","params":{"expression":"'approved by ' + input"}}],
        "edges":[{"source":"ask","target":"decided"}]}"#);
    let parent = bp(r#"{"id":"order","nodes":[
        {"id":"sub","uses":"subflow","params":{"blueprintId":"approval"}},
        {"id":"ship","uses":"transform","params":{"expression":"'shipped: ' + input"}}],
        "edges":[{"source":"sub","target":"ship"}]}"#);
    let runtime = LocalRuntime::builder(inc_registry())
        .blueprints([child, parent.clone()])
        .build();
    let paused = runtime.run(&parent, ContextMap::new());
    assert_eq!(paused.status, RunStatus::Awaiting, "{:?}", paused.errors);
    assert_eq!(paused.context["_awaitingNodeIds"], json!(["sub"]));
    // The resume reaches the child's wait; the child completes, and so does the parent.
    let done = runtime.resume(&parent, paused.context, None, json!("ada"));
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.errors);
    assert!(
        done.context["_outputs.ship"]
            .to_string()
            .contains("approved by ada"),
        "{:?}",
        done.context
    );
}

#[test]
fn flowcraft_s_counter_loop_counts_to_five() {
    let (b, registry) = flowcraft_counter_loop();
    let result = LocalRuntime::new(registry).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["count"], json!(5));
    assert_eq!(result.context["_outputs.increment"], json!(5));
    assert_eq!(result.context["increment"], json!(5));
}

#[test]
fn flowcraft_s_batch_guide_sums_the_doubled_items() {
    let (b, registry) = common::flowcraft_batch_guide();
    let result = LocalRuntime::new(registry).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(result.context["doubled"], json!([20, 40, 60]));
    assert_eq!(result.context["_outputs.sum-results"], json!(120));
}

#[test]
fn flowcraft_s_fallback_guide_processes_the_secondary_data() {
    let (b, registry) = common::flowcraft_fallback_guide();
    let result = LocalRuntime::new(registry).run(&b, ContextMap::new());
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.errors);
    assert_eq!(
        result.context["_outputs.process-data"],
        json!("Processed: Data from secondary API")
    );
}
