//! The `flowcraft` binary's in-process subcommands, run as a subprocess over `examples/`.

use std::process::{Command, Output};

use serde_json::{json, Value};

fn flowcraft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .args(args)
        .env_remove("FLOWCRAFT_BLUEPRINTS")
        .output()
        .expect("run flowcraft")
}

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blueprints");

fn run_example(id: &str, context: Option<&str>) -> (i32, Value) {
    let mut args = vec!["run", "--blueprints", EXAMPLES, id];
    if let Some(c) = context {
        args.extend(["--context", c]);
    }
    let out = flowcraft(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{id}: stdout is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

fn output(result: &Value, node: &str) -> Value {
    result["context"][format!("_outputs.{node}")].clone()
}

#[test]
fn every_example_gives_its_documented_result() {
    let cases: &[(&str, Option<&str>, &str, Value)] = &[
        ("diamond", None, "join", json!(16)),
        ("routing", None, "approve", json!("approved 250")),
        (
            "routing",
            Some(r#"{"amount": 5000}"#),
            "review",
            json!("needs review: 5000"),
        ),
        ("conditions", None, "grade_b", json!("B")),
        (
            "conditions",
            Some(r#"{"score": 95}"#),
            "grade_a",
            json!("A"),
        ),
        ("transform", None, "count", json!(3)),
        ("transform", None, "greet", json!("hello ada")),
        ("retry-fallback", None, "report", json!("served from cache")),
        ("loop", None, "done", json!("counted to 3")),
        ("batch", None, "gather", json!([1, 4, 9, 16])),
        ("batch-loop", None, "done", json!(30)),
        ("subflow", None, "total", json!(120)),
    ];
    for (id, context, node, expected) in cases {
        let (code, result) = run_example(id, *context);
        assert_eq!(code, 0, "{id}: {result}");
        assert_eq!(result["status"], json!("completed"), "{id}: {result}");
        assert_eq!(output(&result, node), *expected, "{id}.{node}: {result}");
    }
}

#[test]
fn any_join_example_runs_its_join_once() {
    let (code, result) = run_example("any-join", None);
    assert_eq!(code, 0);
    let first = output(&result, "first");
    let first = first.as_str().unwrap();
    assert!(
        first == "first answer a:query" || first == "first answer b:query",
        "{first}"
    );
    // The join's input is the winner's output, not the loser's.
    let input = result["context"]["_inputs.first"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(first, format!("first answer {input}"));
}

#[test]
fn approval_example_awaits() {
    let (code, result) = run_example("approval", None);
    assert_eq!(code, 0);
    assert_eq!(result["status"], json!("awaiting"));
    assert_eq!(result["context"]["_awaitingNodeIds"], json!(["decide"]));
}

#[test]
fn a_failed_run_exits_1() {
    let dir = tempdir("failing");
    std::fs::write(
        dir.join("f.json"),
        r#"{"id":"f","nodes":[{"id":"x","uses":"exec","params":{"shell":"echo broken >&2; exit 4"}}]}"#,
    )
    .unwrap();
    let out = flowcraft(&["run", "--blueprints", dir.to_str().unwrap(), "f"]);
    assert_eq!(out.status.code(), Some(1));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], json!("failed"));
    assert!(result["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("exit code 4: broken"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_exits_2_with_a_reason() {
    let out = flowcraft(&[
        "run",
        "--blueprints",
        EXAMPLES,
        "diamond",
        "--context",
        "{not json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context is not valid JSON"));

    let out = flowcraft(&["run", "--blueprints", EXAMPLES, "no-such-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no blueprint with id 'no-such-id'"));

    let out = flowcraft(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));

    let dir = tempdir("invalid");
    std::fs::write(dir.join("bad.json"), r#"{"id":"bad","nodes":[{"id":"a","uses":"transform"}],"edges":[{"source":"a","target":"zz"}]}"#).unwrap();
    let out = flowcraft(&["run", "--blueprints", dir.to_str().unwrap(), "bad"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("target 'zz'"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_lists_every_problem() {
    let out = flowcraft(&["check", "--blueprints", EXAMPLES]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = tempdir("check");
    std::fs::write(
        dir.join("a.json"),
        r#"{"id":"a","nodes":[{"id":"x","uses":"transform"},{"id":"x","uses":"transform"}]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("b.json"), "{\"id\": \n oops").unwrap();
    std::fs::write(
        dir.join("c.json"),
        r#"{"id":"c","nodes":[{"id":"s","uses":"subflow","params":{"blueprintId":"ghost"}}]}"#,
    )
    .unwrap();
    let out = flowcraft(&["check", "--blueprints", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("'x' is used more than once"), "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(text.contains("unknown blueprint 'ghost'"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_lints_what_would_fail_at_run_time() {
    let dir = tempdir("lint");
    std::fs::write(
        dir.join("l.json"),
        r#"{"id":"l","nodes":[{"id":"a","uses":"mystery"},
            {"id":"loop","uses":"loop-controller","params":{"condition":"1 < 2"}},
            {"id":"lonely","uses":"transform","params":{"expression":"1"}}],
            "edges":[{"source":"a","target":"loop"}]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("e.json"),
        r#"{"id":"e","nodes":[{"id":"a","uses":"transform","params":{"expression":"1"}},
            {"id":"b","uses":"transform","params":{"expression":"2"}}],
            "edges":[{"source":"a","target":"b","condition":"a ==="}]}"#,
    )
    .unwrap();
    let out = flowcraft(&["check", "--blueprints", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("error: blueprint 'l': node 'a': uses 'mystery', which is not registered"),
        "{text}"
    );
    assert!(
        text.contains(
            "node 'loop': a loop-controller needs an outgoing edge with action 'continue'"
        ),
        "{text}"
    );
    assert!(
        text.contains("warning: blueprint 'l': node 'lonely': has no edges"),
        "{text}"
    );
    assert!(
        text.contains("edge #0 condition 'a ===' does not parse"),
        "{text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn graph_prints_mermaid_and_env_stands_for_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .args(["graph", "diamond"])
        .env("FLOWCRAFT_BLUEPRINTS", EXAMPLES)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("flowchart TD"));
    assert!(text.contains("start --> double"), "{text}");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flowcraft-test-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
