//! Built-in node implementations (`uses` values that need no user code).
//!
//! - Pausing nodes — `wait`, `sleep`, `webhook`, `subflow` — return an *awaiting* result;
//!   the runtime parks the run (`_awaitingNodeIds`, `_awaitingDetails`) and resumes it later.
//! - Control nodes — `loop-controller`, `batch-scatter`, `batch-gather`.
//! - General-purpose nodes — `transform` (an expression) and `exec` (an external program), so
//!   blueprints need no Rust code.

pub mod batch;
pub mod exec;
pub mod subflow;
pub mod transform;

use serde_json::{json, Value};

use crate::engine::expr::{Expression, Scope};
use crate::engine::node::{ContextScope, NodeContext, NodeError, NodeResult};
use crate::engine::registry::NodeRegistry;

/// `uses` of every built-in.
pub const BUILTINS: &[&str] = &[
    "wait",
    "sleep",
    "webhook",
    "subflow",
    "batch-scatter",
    "batch-gather",
    "loop-controller",
    "transform",
    "exec",
];

impl NodeRegistry {
    /// A registry holding every built-in node (`wait`, `sleep`, `webhook`, `subflow`,
    /// `batch-scatter`, `batch-gather`, `loop-controller`, `transform`, `exec`).
    pub fn with_builtins() -> NodeRegistry {
        let mut r = NodeRegistry::new();
        register_builtins(&mut r);
        r
    }
}

/// Registers every built-in node.
pub fn register_builtins(registry: &mut NodeRegistry) {
    registry.register_fn("wait", wait);
    registry.register_fn("sleep", sleep);
    registry.register_fn("webhook", webhook);
    registry.register_fn("subflow", subflow::subflow);
    registry.register_fn("batch-scatter", batch::scatter);
    registry.register_fn("batch-gather", batch::gather);
    registry.register_fn("loop-controller", loop_controller);
    registry.register_fn("transform", transform::transform);
    registry.register_fn("exec", exec::exec);
}

/// `wait`: pauses the run until it is resumed.
fn wait(_ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    Ok(NodeResult::awaiting(
        json!({"type": "wait", "reason": "external_event"}),
    ))
}

/// `webhook`: pauses the run until its webhook is called; the runtime registers the endpoint
/// and adds `url` and `event` to the details.
fn webhook(_ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    Ok(NodeResult::awaiting(
        json!({"type": "webhook", "reason": "external_event"}),
    ))
}

/// `sleep`: pauses the run for `params.duration` (ms number, or "10s", "5m", "1h", "2d").
fn sleep(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let duration = ctx
        .params
        .get("duration")
        .ok_or_else(|| NodeError::fatal("sleep needs params.duration"))?;
    let ms = parse_duration_ms(duration).map_err(NodeError::fatal)?;
    let wake_up_ms = now_ms().saturating_add(ms);
    Ok(NodeResult::awaiting(json!({
        "type": "sleep",
        "reason": "timer",
        "durationMs": ms,
        "wakeUpAtMs": wake_up_ms,
        "wakeUpAt": rfc3339_from_ms(wake_up_ms),
    })))
}

/// What is wrong with the params of a built-in node that takes expressions (`transform`,
/// `loop-controller`), found without running it: each problem fails the node at run time.
pub fn param_problems(uses: &str, params: &Value) -> Vec<String> {
    match uses {
        "transform" => transform::param_problems(params),
        "loop-controller" => match params.get("condition") {
            Some(Value::String(source)) => match Expression::parse(source) {
                Ok(_) => Vec::new(),
                Err(e) => vec![format!("loop-controller condition '{source}': {e}")],
            },
            _ => vec!["loop-controller needs params.condition (a string)".to_string()],
        },
        _ => Vec::new(),
    }
}

/// `loop-controller`: evaluates `params.condition` over the context; action `continue` while
/// it holds, `break` once it does not.
fn loop_controller(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let source = ctx
        .params
        .get("condition")
        .and_then(Value::as_str)
        .ok_or_else(|| NodeError::fatal("loop-controller needs params.condition (a string)"))?;
    let condition = Expression::parse(source)
        .map_err(|e| NodeError::fatal(format!("loop-controller condition '{source}': {e}")))?;
    let scope = LoopScope(ContextScope::new(&ctx.context));
    let go_on = condition.evaluate_bool(&scope);
    let action = if go_on { "continue" } else { "break" };
    Ok(NodeResult::output(Value::Null).with_action(action))
}

/// A loop condition's scope: the context's keys as names (`_outputs.body < 3`), and the
/// context itself as `context` (`context.count < 5`, as Flowcraft's docs write loops).
struct LoopScope<'a>(ContextScope<'a>);

impl Scope for LoopScope<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        self.0
            .lookup_context(key)
            .or_else(|| self.0.view().get(key))
    }

    fn defers(&self, key: &str) -> bool {
        key == "context"
    }
}

/// Parses a duration: a number of milliseconds, or a string `<n>ms|s|m|h|d` (a bare number
/// string is milliseconds).
pub fn parse_duration_ms(value: &Value) -> Result<u64, String> {
    let bad =
        || format!("invalid duration {value}: use milliseconds or \"10s\", \"5m\", \"1h\", \"2d\"");
    match value {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.is_finite())
                    .map(|f| f as u64)
            })
            .ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().map_err(|_| bad())?;
            let factor = match unit.trim() {
                "" | "ms" => 1.0,
                "s" => 1_000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                _ => return Err(bad()),
            };
            let ms = n * factor;
            if ms.is_finite() && ms >= 0.0 {
                Ok(ms as u64)
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Formats epoch milliseconds as an RFC 3339 UTC timestamp.
pub fn rfc3339_from_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::node::ContextView;
    use std::sync::Arc;

    #[test]
    fn pauses_carry_flowcraft_s_reason() {
        let mut ctx = NodeContext {
            input: Value::Null,
            params: json!({"duration": "1h"}),
            context: ContextView::new(Arc::new(Default::default())),
            run_id: "r".into(),
            node_id: "n".into(),
            blueprint_id: "b".into(),
            attempt: 1,
            cancel: Default::default(),
        };
        let slept = sleep(&mut ctx).unwrap().awaiting.unwrap();
        assert_eq!(slept["reason"], json!("timer"));
        assert!(slept["wakeUpAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            wait(&mut ctx).unwrap().awaiting.unwrap()["reason"],
            json!("external_event")
        );
        assert_eq!(
            webhook(&mut ctx).unwrap().awaiting.unwrap()["reason"],
            json!("external_event")
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms(&json!(250)), Ok(250));
        assert_eq!(parse_duration_ms(&json!("10s")), Ok(10_000));
        assert_eq!(parse_duration_ms(&json!("5m")), Ok(300_000));
        assert_eq!(parse_duration_ms(&json!("1h")), Ok(3_600_000));
        assert_eq!(parse_duration_ms(&json!("2d")), Ok(172_800_000));
        assert_eq!(parse_duration_ms(&json!("1.5s")), Ok(1_500));
        assert!(parse_duration_ms(&json!("10 parsecs")).is_err());
        assert!(parse_duration_ms(&json!(-1)).is_err());
        assert!(parse_duration_ms(&json!(null)).is_err());
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_from_ms(1_795_000_000_123),
            "2026-11-18T11:06:40.123Z"
        );
        assert_eq!(rfc3339_from_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
