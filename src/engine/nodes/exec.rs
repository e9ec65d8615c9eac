//! `exec`: runs an external program as a node, so blueprints need no Rust code.
//!
//! `params.command` (an argv array, no shell) or `params.shell` (a string run with `sh -c`);
//! optional `params.env` (object of strings) and `params.cwd`. The program receives
//! `{"input","params","context","runId","nodeId","attempt"}` as JSON on stdin and answers on
//! stdout with `{"output"?, "action"?, "context"?}` (`context`: an object of keys to set);
//! empty stdout means output `null`. A non-zero exit fails the attempt with the exit code and
//! the last stderr line; stdout that is not such an object fails it naming the problem; when
//! the attempt is cancelled (timeout) the child is killed.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::engine::node::{NodeContext, NodeError, NodeResult};

/// The `exec` node.
pub fn exec(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let mut command = build_command(&ctx.params)?;
    let request = json!({
        "input": ctx.input,
        "params": ctx.params,
        "context": ctx.context.to_json(),
        "runId": ctx.run_id,
        "nodeId": ctx.node_id,
        "attempt": ctx.attempt,
    });
    let request = serde_json::to_vec(&request)
        .map_err(|e| NodeError::new(format!("exec: cannot encode the request: {e}")))?;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NodeError::new(format!("exec: cannot start {}: {e}", describe(&ctx.params)))
        })?;
    let stdin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let Some(mut stdin) = stdin {
            // A program that does not read its stdin closes the pipe: not an error.
            let _ = stdin.write_all(&request);
        }
    });
    let stdout = read_all_in_background(child.stdout.take());
    let stderr = read_all_in_background(child.stderr.take());
    let mut pause = Duration::from_micros(100);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if ctx.cancel.is_cancelled() => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NodeError::new("exec: cancelled; the child was killed"));
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(NodeError::new(format!(
                    "exec: waiting for the child failed: {e}"
                )))
            }
        }
    };
    let _ = writer.join();
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let code = status
            .code()
            .map(|c| format!("exit code {c}"))
            .unwrap_or_else(|| "a signal".to_string());
        let last = String::from_utf8_lossy(&stderr)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {}", l.trim()))
            .unwrap_or_default();
        return Err(NodeError::new(format!(
            "exec: {} ended with {code}{last}",
            describe(&ctx.params)
        )));
    }
    parse_reply(&stdout, ctx)
}

fn build_command(params: &Value) -> Result<Command, NodeError> {
    let mut command = match (params.get("command"), params.get("shell")) {
        (Some(Value::Array(argv)), None) => {
            let argv: Vec<&str> = argv.iter().filter_map(Value::as_str).collect();
            let Some((program, args)) = argv.split_first() else {
                return Err(NodeError::fatal(
                    "exec params.command must be a non-empty array of strings",
                ));
            };
            if argv.len() != params["command"].as_array().map_or(0, Vec::len) {
                return Err(NodeError::fatal(
                    "exec params.command must contain only strings",
                ));
            }
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        (None, Some(Value::String(script))) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script);
            c
        }
        (Some(_), Some(_)) => {
            return Err(NodeError::fatal(
                "exec takes params.command or params.shell, not both",
            ))
        }
        _ => {
            return Err(NodeError::fatal(
                "exec needs params.command (array of strings) or params.shell (string)",
            ))
        }
    };
    match params.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(env)) => {
            for (k, v) in env {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                command.env(k, v);
            }
        }
        Some(_) => return Err(NodeError::fatal("exec params.env must be an object")),
    }
    match params.get("cwd") {
        None | Some(Value::Null) => {}
        Some(Value::String(dir)) => {
            command.current_dir(dir);
        }
        Some(_) => return Err(NodeError::fatal("exec params.cwd must be a string")),
    }
    Ok(command)
}

fn describe(params: &Value) -> String {
    match (params.get("command"), params.get("shell")) {
        (Some(Value::Array(argv)), _) => format!(
            "command '{}'",
            argv.first().and_then(Value::as_str).unwrap_or_default()
        ),
        _ => "shell script".to_string(),
    }
}

fn read_all_in_background<R: Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn parse_reply(stdout: &[u8], ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Ok(NodeResult::output(Value::Null));
    }
    let reply: Value = serde_json::from_str(text.trim()).map_err(|e| {
        NodeError::new(format!(
            "exec: stdout is not JSON ({e}); expected {{\"output\", \"action\", \"context\"}}"
        ))
    })?;
    let Value::Object(mut reply) = reply else {
        return Err(NodeError::new(
            "exec: stdout must be a JSON object {\"output\"?, \"action\"?, \"context\"?}",
        ));
    };
    let action = match reply.remove("action") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) => Some(a),
        Some(_) => {
            return Err(NodeError::new(
                "exec: stdout field \"action\" must be a string",
            ))
        }
    };
    match reply.remove("context") {
        None | Some(Value::Null) => {}
        Some(Value::Object(writes)) => {
            for (k, v) in writes {
                ctx.context.set(k, v);
            }
        }
        Some(_) => {
            return Err(NodeError::new(
                "exec: stdout field \"context\" must be an object",
            ))
        }
    }
    Ok(NodeResult {
        output: reply.remove("output").unwrap_or(Value::Null),
        action,
        ..NodeResult::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::node::{CancelFlag, ContextView};
    use std::sync::Arc;

    fn ctx(params: Value, input: Value) -> NodeContext {
        NodeContext {
            input,
            params,
            context: ContextView::new(Arc::new(Default::default())),
            run_id: "r".into(),
            node_id: "n".into(),
            blueprint_id: "b".into(),
            attempt: 1,
            cancel: CancelFlag::new(),
        }
    }

    #[test]
    fn shell_reads_stdin_and_answers_on_stdout() {
        let script = r#"read line; case "$line" in *'"input":41'*) echo '{"output":42,"action":"ok","context":{"k":1}}';; *) echo '{}';; esac"#;
        let mut c = ctx(json!({"shell": script}), json!(41));
        let r = exec(&mut c).unwrap();
        assert_eq!(r.output, json!(42));
        assert_eq!(r.action.as_deref(), Some("ok"));
        assert_eq!(c.context.get("k"), Some(&json!(1)));
    }

    #[test]
    fn argv_command_env_and_empty_stdout() {
        let mut c = ctx(
            json!({"command": ["sh", "-c", "test \"$X\" = yes"], "env": {"X": "yes"}}),
            json!(null),
        );
        assert_eq!(exec(&mut c).unwrap().output, Value::Null);
    }

    #[test]
    fn non_zero_exit_carries_code_and_last_stderr_line() {
        let mut c = ctx(
            json!({"shell": "echo first >&2; echo 'disk full' >&2; exit 3"}),
            json!(null),
        );
        let e = exec(&mut c).unwrap_err();
        assert!(
            e.message().contains("exit code 3") && e.message().contains("disk full"),
            "{e}"
        );
        assert!(!e.is_fatal());
    }

    #[test]
    fn unparsable_stdout_is_a_failed_attempt() {
        let mut c = ctx(json!({"shell": "echo not-json"}), json!(null));
        let e = exec(&mut c).unwrap_err();
        assert!(e.message().contains("not JSON"), "{e}");
        let mut c = ctx(json!({"shell": "echo '[1]'"}), json!(null));
        assert!(exec(&mut c)
            .unwrap_err()
            .message()
            .contains("must be a JSON object"));
    }

    #[test]
    fn bad_params_are_fatal() {
        assert!(exec(&mut ctx(json!({}), json!(null)))
            .unwrap_err()
            .is_fatal());
        assert!(exec(&mut ctx(json!({"command": []}), json!(null)))
            .unwrap_err()
            .is_fatal());
        assert!(exec(&mut ctx(
            json!({"command": ["a"], "shell": "b"}),
            json!(null)
        ))
        .unwrap_err()
        .is_fatal());
    }

    #[test]
    fn cancellation_kills_the_child() {
        let mut c = ctx(json!({"shell": "sleep 30"}), json!(null));
        c.cancel.cancel();
        let e = exec(&mut c).unwrap_err();
        assert!(e.message().contains("killed"), "{e}");
    }
}
