//! [`lint`]: what `flowcraft check` reports about a blueprint beyond its validity — the
//! problems Flowcraft's linter finds, and a few more — for embedders with their own node
//! registry as for the binary with its built-ins.
//!
//! | finding | severity |
//! | --- | --- |
//! | a node's `uses` (or a batch's `workerUsesKey`) that the registry does not have | error |
//! | a `loop-controller` with no outgoing `continue` edge | error |
//! | a `transform` or `loop-controller` whose expression does not parse | error |
//! | a `subflow` naming a blueprint that is not known | error |
//! | a node with no edges at all, in a blueprint of several nodes | warning |
//!
//! (An edge condition or transform that does not parse makes the blueprint invalid at load.)

use serde_json::Value;

use crate::engine::blueprint::Blueprint;
use crate::engine::nodes::param_problems;
use crate::engine::registry::NodeRegistry;

/// How bad a finding is: errors fail `check` (exit 1); warnings are reported only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The blueprint will fail at run time.
    Error,
    /// Probably a mistake, but the blueprint can run.
    Warning,
}

/// One thing [`lint`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The node it is about.
    pub node: String,
    /// What is wrong, in a sentence.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node '{}': {}", self.node, self.message)
    }
}

/// Lints `bp` against the node implementations of `registry`; `known_blueprint` says whether
/// a subflow's child blueprint exists.
pub fn lint(
    bp: &Blueprint,
    registry: &NodeRegistry,
    known_blueprint: &dyn Fn(&str) -> bool,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let def = bp.def();
    let connected: std::collections::HashSet<&str> = def
        .edges
        .iter()
        .flat_map(|e| [e.source.as_str(), e.target.as_str()])
        .chain(
            def.nodes
                .iter()
                .filter_map(|n| n.config.fallback.as_deref()),
        )
        .collect();
    for (i, node) in def.nodes.iter().enumerate() {
        let mut found = |severity, message: String| {
            findings.push(Finding {
                severity,
                node: node.id.clone(),
                message,
            })
        };
        if !registry.contains(&node.uses) {
            found(
                Severity::Error,
                format!("uses '{}', which is not registered", node.uses),
            );
        }
        for problem in param_problems(&node.uses, &node.params) {
            found(Severity::Error, problem);
        }
        match node.uses.as_str() {
            "batch-scatter" => match node.params.get("workerUsesKey").and_then(Value::as_str) {
                Some(worker) if !registry.contains(worker) => found(
                    Severity::Error,
                    format!("workerUsesKey '{worker}' is not registered"),
                ),
                Some(_) => {}
                None => found(
                    Severity::Error,
                    "batch-scatter needs params.workerUsesKey".into(),
                ),
            },
            "loop-controller" => {
                let continues = bp
                    .outgoing(i)
                    .iter()
                    .any(|&e| bp.edge(e).action.as_deref() == Some("continue"));
                if !continues {
                    found(
                        Severity::Error,
                        "a loop-controller needs an outgoing edge with action 'continue'".into(),
                    );
                }
            }
            "subflow" => match node.params.get("blueprintId").and_then(Value::as_str) {
                Some(child) if !known_blueprint(child) => found(
                    Severity::Error,
                    format!("subflow names unknown blueprint '{child}'"),
                ),
                Some(_) => {}
                None => found(Severity::Error, "subflow needs params.blueprintId".into()),
            },
            _ => {}
        }
        if def.nodes.len() > 1 && !connected.contains(node.id.as_str()) {
            found(
                Severity::Warning,
                "has no edges: it runs as a start node of its own".into(),
            );
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(findings: &[Finding], severity: Severity) -> Vec<String> {
        findings
            .iter()
            .filter(|f| f.severity == severity)
            .map(|f| f.node.clone())
            .collect()
    }

    #[test]
    fn finds_what_would_fail_at_run_time() {
        let bp = Blueprint::from_json(
            r#"{"id":"x","nodes":[
            {"id":"a","uses":"mystery"},
            {"id":"b","uses":"batch-scatter","params":{"workerUsesKey":"nope","gatherNodeId":"c"}},
            {"id":"c","uses":"batch-gather"},
            {"id":"loop","uses":"loop-controller","params":{"condition":"x < 3"}},
            {"id":"t","uses":"transform","params":{"expression":"(1 +"}},
            {"id":"s","uses":"subflow","params":{"blueprintId":"ghost"}},
            {"id":"lonely","uses":"transform","params":{"expression":"1"}}],
            "edges":[{"source":"a","target":"b"},{"source":"b","target":"c"},
              {"source":"c","target":"loop"},{"source":"loop","target":"t","action":"break"},
              {"source":"t","target":"s"}]}"#,
        )
        .unwrap();
        let findings = lint(&bp, &NodeRegistry::with_builtins(), &|id| id == "x");
        assert_eq!(
            ids(&findings, Severity::Error),
            ["a", "b", "loop", "t", "s"],
            "{findings:#?}"
        );
        assert_eq!(ids(&findings, Severity::Warning), ["lonely"]);
    }

    #[test]
    fn a_sound_blueprint_has_no_findings() {
        let bp = Blueprint::from_json(
            r#"{"id":"ok","nodes":[
            {"id":"init","uses":"transform","params":{"expression":"0"}},
            {"id":"loop","uses":"loop-controller","params":{"condition":"(_outputs.body ?? 0) < 3"}},
            {"id":"body","uses":"transform","params":{"expression":"(input ?? 0) + 1"}},
            {"id":"done","uses":"transform","params":{"expression":"'done'"}}],
            "edges":[{"source":"init","target":"loop"},
              {"source":"loop","target":"body","action":"continue"},
              {"source":"body","target":"loop"},
              {"source":"loop","target":"done","action":"break"}]}"#,
        )
        .unwrap();
        assert!(lint(&bp, &NodeRegistry::with_builtins(), &|_| false).is_empty());
    }
}
