//! `transform`: computes its output with an expression, so simple data shaping needs no code.
//!
//! `params.expression` is evaluated over `{input, context, params}`; the optional
//! `params.action` expression, when it yields a string, becomes the result's action.

use serde_json::Value;

use crate::engine::expr::{Expression, Scope};
use crate::engine::node::{ContextScope, NodeContext, NodeError, NodeResult};

/// `{input, context, params}`, `context` read key by key ([`ContextScope`]).
struct TransformScope<'a> {
    input: &'a Value,
    context: ContextScope<'a>,
    params: &'a Value,
}

impl Scope for TransformScope<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        match key {
            "input" => Some(self.input),
            "params" => Some(self.params),
            _ => self.context.lookup_context(key),
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
        context: ContextScope::new(&ctx.context),
        params: &ctx.params,
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
