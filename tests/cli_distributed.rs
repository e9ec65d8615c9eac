//! The `flowcraft` binary end to end: migrate, two worker processes, runs started from the
//! command line, a worker stopped with SIGTERM mid-batch — and its bad-input answers.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run flowcraft")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A blueprint with an `exec` node (python3 doubles context.n) and a `transform` (+1).
fn blueprint_dir(env: &TestEnv) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flowcraft-e2e-{}", env.tag));
    std::fs::create_dir_all(&dir).unwrap();
    let bp = json!({
        "id": "e2e",
        "metadata": {"version": "1"},
        "nodes": [
            {"id": "double", "uses": "exec", "params": {"command": ["python3", "-c",
                "import json,sys; d=json.load(sys.stdin); print(json.dumps({'output': d['context']['n'] * 2, 'context': {'seen': True}}))"]}},
            {"id": "plus_one", "uses": "transform", "params": {"expression": "input + 1"}}
        ],
        "edges": [{"source": "double", "target": "plus_one"}]
    });
    std::fs::write(dir.join("e2e.json"), bp.to_string()).unwrap();
    dir
}

/// A `flowcraft worker` process on blueprint directory `dir` with two threads, no
/// reconciler and `extra` arguments; its output is discarded.
fn spawn_worker(env: &TestEnv, dir: &str, extra: &[&str]) -> Child {
    env.flowcraft_command()
        .args([
            "worker",
            "--blueprints",
            dir,
            "--threads",
            "2",
            "--reconcile-every",
            "0",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

fn start_worker(env: &TestEnv, dir: &std::path::Path) -> Child {
    spawn_worker(env, dir.to_str().unwrap(), &[])
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn two_workers_finish_every_run_and_sigterm_loses_nothing() {
    let env = TestEnv::without_tables("cli_e2e");
    let dir = blueprint_dir(&env);
    let out = run(env.flowcraft_command().arg("migrate"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("applied 0001_init"),
        "{}",
        text(&out.stdout)
    );
    let out = run(env.flowcraft_command().arg("migrate"));
    assert!(text(&out.stdout).contains("up to date"));

    let mut first = start_worker(&env, &dir);
    let mut second = start_worker(&env, &dir);
    let start_runs = |range: std::ops::Range<i64>| -> Vec<(i64, String)> {
        range
            .map(|n| {
                let context = json!({"n": n}).to_string();
                let out = run(env.flowcraft_command().args([
                    "start",
                    "--blueprints",
                    dir.to_str().unwrap(),
                    "e2e",
                    "--context",
                    &context,
                ]));
                assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
                (n, text(&out.stdout).trim().to_string())
            })
            .collect()
    };
    let mut runs = start_runs(0..10);
    // Mid-batch: the first worker finishes its in-flight jobs and exits cleanly.
    sigterm(&first);
    assert_eq!(first.wait().unwrap().code(), Some(0));
    runs.extend(start_runs(10..20));
    for (n, run_id) in &runs {
        let row = env.wait_for_status(run_id, "completed", Duration::from_secs(60));
        let context = &row.result.unwrap()["context"];
        assert_eq!(
            context["_outputs.plus_one"],
            json!(n * 2 + 1),
            "run {run_id}"
        );
        assert_eq!(context["seen"], json!(true));
    }
    // status prints the documented JSON.
    let out = run(env.flowcraft_command().args(["status", &runs[0].1]));
    assert_eq!(out.status.code(), Some(0));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["runId"], json!(runs[0].1));
    assert_eq!(status["status"], json!("completed"));
    assert!(status["updatedAt"].as_str().unwrap().ends_with('Z'));
    // start --wait prints the final status and exits 0.
    let out = run(env.flowcraft_command().args([
        "start",
        "--blueprints",
        dir.to_str().unwrap(),
        "e2e",
        "--context",
        "{\"n\": 50}",
        "--wait",
        "--timeout",
        "60",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["result"]["context"]["_outputs.plus_one"], json!(101));
    sigterm(&second);
    assert_eq!(second.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Arguments, an environment override, the exit code, and what stderr must say.
type BadInput<'a> = (Vec<&'a str>, Option<(&'a str, &'a str)>, i32, &'a str);

#[test]
fn operator_commands_answer_bad_input_clearly() {
    let env = TestEnv::new("cli_bad");
    let dir = blueprint_dir(&env);
    let dir = dir.to_str().unwrap().to_string();
    let bad = std::env::temp_dir().join(format!("flowcraft-bad-{}", env.tag));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("x.json"),
        r#"{"id":"x","nodes":[{"id":"a","uses":"transform"}],"edges":[{"source":"a","target":"nope"}]}"#,
    )
    .unwrap();
    let bad_dir = bad.to_str().unwrap().to_string();
    let bad_expr = std::env::temp_dir().join(format!("flowcraft-badexpr-{}", env.tag));
    std::fs::create_dir_all(&bad_expr).unwrap();
    std::fs::write(
        bad_expr.join("t.json"),
        r#"{"id":"t","nodes":[{"id":"a","uses":"transform","params":{"expression":"(input + 1"}}]}"#,
    )
    .unwrap();
    let bad_expr_dir = bad_expr.to_str().unwrap().to_string();
    let deep = format!("{{\"k\": {}1{}}}", "[".repeat(100), "]".repeat(100));
    let cases: Vec<BadInput> = vec![
        (
            vec!["start", "--blueprints", &dir, "e2e", "--context", &deep],
            None,
            2,
            "cannot be stored: it is nested deeper than 64 levels",
        ),
        (
            vec!["start", "--blueprints", &dir, "e2e", "--run-id", "a\u{1}b"],
            None,
            2,
            "invalid run id: the run id contains a control character",
        ),
        (
            vec![
                "resume",
                "--blueprints",
                &dir,
                "some-run",
                "--action",
                "go",
                "--output",
                r#""a\u0000b""#,
            ],
            None,
            2,
            "the output cannot be stored",
        ),
        (vec!["frobnicate"], None, 2, "unrecognized subcommand"),
        (
            vec!["worker", "--blueprints", &bad_dir],
            None,
            2,
            "target 'nope'",
        ),
        (
            vec!["worker", "--blueprints", "/no/such/dir"],
            None,
            2,
            "cannot read blueprint directory",
        ),
        (
            vec!["status", "some-run"],
            Some((
                "POSTGRES_URL",
                "postgres://postgres:hunter2@127.0.0.1:1/postgres",
            )),
            2,
            "cannot reach PostgreSQL at postgres://postgres:***@127.0.0.1:1/postgres",
        ),
        (
            vec!["cancel", "r"],
            Some(("RABBITMQ_URL", "amqp://guest:secret@127.0.0.1:1/%2f")),
            2,
            "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f",
        ),
        (
            vec!["cancel", "r"],
            Some(("REDIS_URL", "redis://127.0.0.1:1")),
            2,
            "cannot reach Redis at redis://127.0.0.1:1",
        ),
        (
            vec!["status", "no-such-run"],
            None,
            1,
            "no run with id 'no-such-run'",
        ),
        (
            vec!["status", "some-run"],
            Some(("FLOWCRAFT_STATUSES_TABLE", "flowcraft_never_made")),
            1,
            "relation \"flowcraft_never_made\" does not exist (SQLSTATE 42P01)",
        ),
        (
            vec!["start", "--blueprints", &dir, "e2e", "--context", "[1,"],
            None,
            2,
            "--context is not valid JSON",
        ),
        (
            vec!["resume", "--blueprints", &dir, "ghost", "--action", "go"],
            None,
            1,
            "does not exist",
        ),
    ];
    for (args, env_override, code, needle) in cases {
        let mut cmd = env.flowcraft_command();
        cmd.args(&args);
        if let Some((k, v)) = env_override {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("hunter2") && !err.contains("secret"),
            "{err}"
        );
        if env_override.is_some() {
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        }
    }
    // `check` parses the expressions of transform nodes.
    let out = run(env
        .flowcraft_command()
        .args(["check", "--blueprints", &bad_expr_dir]));
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.contains("node 'a': transform params.expression '(input + 1'"),
        "{report}"
    );
    std::fs::remove_dir_all(bad).unwrap();
    std::fs::remove_dir_all(bad_expr).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn demo_prints_its_summary() {
    let mut env = TestEnv::without_tables("cli_demo");
    // The demo's own queue and its dead-letter queue.
    let demo = format!("{}.demo", env.queue);
    env.extra_queues.push(format!("{demo}.dead"));
    env.extra_queues.push(demo);
    let out = run(env
        .flowcraft_command()
        .args(["demo", "--runs", "20", "--threads", "2"]));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("runs completed   20 of 20"), "{stdout}");
    assert!(
        stdout.contains("jobs/s") && stdout.contains("p99"),
        "{stdout}"
    );
    assert!(stdout.contains("\"_outputs.summary\""), "{stdout}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pause_worker(env: &TestEnv, port: Option<u16>, public: u16) -> Child {
    let public_url = format!("http://127.0.0.1:{public}");
    let listen = port.map(|port| format!("127.0.0.1:{port}"));
    let mut extra = vec!["--public-url", public_url.as_str()];
    if let Some(listen) = &listen {
        extra.extend(["--webhook-listen", listen.as_str()]);
    }
    spawn_worker(env, EXAMPLES_DIR, &extra)
}

#[test]
fn worker_processes_keep_timers_across_restarts_and_take_webhook_calls() {
    let mut env = TestEnv::without_tables("cli_pauses");
    env.extra_queues.push(format!("{}.delay.2000", env.queue));
    assert_eq!(
        run(env.flowcraft_command().arg("migrate")).status.code(),
        Some(0)
    );
    let port = free_port();
    let mut first = pause_worker(&env, None, port);
    let mut second = pause_worker(&env, None, port);
    let start = |id: &str| -> String {
        let out = run(env
            .flowcraft_command()
            .args(["start", "--blueprints", EXAMPLES_DIR, id]));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let sleeper = start("sleep");
    let hooked = start("webhook-approval");
    env.wait_for_status(&sleeper, "awaiting", WAIT);
    env.wait_for_status(&hooked, "awaiting", WAIT);
    // Every worker stops while the timer runs; the wake-up waits in RabbitMQ.
    sigterm(&first);
    sigterm(&second);
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert_eq!(second.wait().unwrap().code(), Some(0));
    env.eventually("the timer fires into the job queue", WAIT, || {
        env.queue_depth(&env.queue) == 1
    });
    assert_eq!(
        env.store().status(&sleeper).unwrap().unwrap().status,
        "awaiting"
    );
    // A new worker process (with the webhook receiver) picks everything up.
    let mut third = pause_worker(&env, Some(port), port);
    let row = env.wait_for_status(&sleeper, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.after"],
        json!("ready, then woke up")
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = format!("/webhooks/{hooked}/review");
    let body = br#"{"decision": "approve"}"#;
    env.eventually("the receiver accepts the call", WAIT, || {
        http_post(addr, &path, body, &[]).0 == 202
    });
    let row = env.wait_for_status(&hooked, "completed", WAIT);
    assert_eq!(
        row.result.unwrap()["context"]["_outputs.approved"],
        json!("approved: laptop")
    );
    assert_eq!(http_post(addr, &path, body, &[]).0, 409);
    sigterm(&third);
    assert_eq!(third.wait().unwrap().code(), Some(0));
}
