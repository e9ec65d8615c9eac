//! `transform`: computes its output with an expression, so simple data shaping needs no code.
//!
//! `params.expression` is evaluated over `{input, context, params}`; the optional
//! `params.action` expression, when it yields a string, becomes the result's action.

use std::sync::OnceLock;

use serde_json::Value;

use crate::engine::expr::{Expression, Scope};
use crate::engine::node::{ContextView, NodeContext, NodeError, NodeResult};

/// `{input, context, params}`. `context` is read key by key from the node's view —
/// `context.items`, `context._outputs.n1.total` (the flat key `_outputs.n1`) and
/// `context['_outputs.n1']` go straight to the key — and is built whole only for an
/// expression that names `context` itself, so a transform costs what it reads, not the size
/// of the run.
struct TransformScope<'a> {
    input: &'a Value,
    context: &'a ContextView,
    params: &'a Value,
    whole_context: OnceLock<Value>,
}

impl Scope for TransformScope<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        match key {
            "input" => Some(self.input),
            "params" => Some(self.params),
            "context" => Some(self.whole_context.get_or_init(|| self.context.to_json())),
            _ => {
                // `context.<key>` as the evaluator asks for a flat key under a name
                // (`context._outputs.n1` reads the key `_outputs.n1`, as at the top level).
                let member = key.strip_prefix("context.")?;
                self.context.get(member)
            }
        }
    }

    fn defers(&self, key: &str) -> bool {
        key == "context"
    }
}

fn compile(params: &Value, key: &str) -> Result<Option<Expression>, NodeError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(src)) => Expression::parse(src)
            .map(Some)
            .map_err(|e| NodeError::fatal(format!("transform params.{key} '{src}': {e}"))),
        Some(_) => Err(NodeError::fatal(format!(
            "transform params.{key} must be a string"
        ))),
    }
}

/// What is wrong with a `transform` node's params, found without running it (for `check`).
pub fn param_problems(params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    match compile(params, "expression") {
        Ok(Some(_)) => {}
        Ok(None) => problems.push("transform needs params.expression (a string)".to_string()),
        Err(e) => problems.push(e.message().to_string()),
    }
    if let Err(e) = compile(params, "action") {
        problems.push(e.message().to_string());
    }
    problems
}

/// The `transform` node.
pub fn transform(ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
    let expression = compile(&ctx.params, "expression")?
        .ok_or_else(|| NodeError::fatal("transform needs params.expression (a string)"))?;
    let action = compile(&ctx.params, "action")?;
    let scope = TransformScope {
        input: &ctx.input,
        context: &ctx.context,
        params: &ctx.params,
        whole_context: OnceLock::new(),
    };
    let output = expression.evaluate(&scope);
    let action = action.and_then(|a| match a.evaluate(&scope) {
        Value::String(s) => Some(s),
        _ => None,
    });
    Ok(NodeResult {
        output,
        action,
        ..NodeResult::default()
    })
}
