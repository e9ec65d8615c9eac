//! Blueprints: the JSON model of a workflow, its validation and its analysis.
//!
//! A [`Blueprint`] is parsed from Flowcraft's JSON (camelCase, unknown fields ignored),
//! validated once, and analysed once: start and terminal nodes, back edges (edges that close
//! a cycle), forward predecessors for joins, fallback relations, and every edge condition and
//! transform compiled to an [`Expression`]. Workers keep blueprints behind an `Arc` and never
//! re-analyse them per job.
//!
//! ```
//! use flowcraft_rabbitmq::blueprint::Blueprint;
//! let bp = Blueprint::from_json(r#"{"id":"demo","nodes":[{"id":"a","uses":"inc"},
//!     {"id":"b","uses":"inc"}],"edges":[{"source":"a","target":"b"}]}"#).unwrap();
//! assert_eq!(bp.start_node_ids(), vec!["a"]);
//! assert_eq!(bp.terminal_node_ids(), vec!["b"]);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::expr::Expression;
use crate::vocabulary::limits::{check_id, cut_reason, MAX_ID_BYTES};

/// Errors found while loading or validating a blueprint. Each names what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum BlueprintError {
    /// The text is not a blueprint document: bad JSON, or a field of the wrong type.
    #[error("blueprint JSON is malformed at line {line}, column {column}: {message}")]
    Malformed {
        /// 1-based line where parsing stopped.
        line: usize,
        /// 1-based column where parsing stopped.
        column: usize,
        /// serde_json's message; [`Blueprint::from_path`] prefixes the file's path.
        message: String,
    },
    /// The blueprint file could not be read.
    #[error("cannot read blueprint file {path}: {message}")]
    Io {
        /// The file's path, as given.
        path: String,
        /// The I/O error's message.
        message: String,
    },
    /// The document parsed but breaks a rule: an empty or repeated id, an edge or fallback
    /// naming a missing node, an unknown `joinStrategy`, or no start node.
    #[error("blueprint '{blueprint}': {problem}")]
    Invalid {
        /// The blueprint's id (empty when the id itself is the problem).
        blueprint: String,
        /// What is wrong, naming the node or edge at fault.
        problem: String,
    },
}

impl BlueprintError {
    fn invalid(blueprint: &str, problem: impl Into<String>) -> Self {
        BlueprintError::Invalid {
            blueprint: blueprint.to_string(),
            problem: problem.into(),
        }
    }
}

/// How a node with several incoming edges waits for its predecessors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinStrategy {
    /// Ready once every forward predecessor has reported (the default).
    All,
    /// Ready when the first predecessor reports; later ones do nothing.
    Any,
}

/// The `inputs` of a node: one source string, or an object of source strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeInputs {
    /// One source: the input is its value.
    Key(String),
    /// Named sources: the input is an object of their values under the same names.
    Map(BTreeMap<String, String>),
}

/// `config` of a node, exactly as Flowcraft spells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// Total attempts (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Milliseconds to wait between attempts (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<u64>,
    /// Milliseconds an attempt may take before it counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Id of the node that runs when every attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// `"all"` (default) or `"any"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_strategy: Option<String>,
}

/// One node of a blueprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDef {
    /// Node id, unique within the blueprint.
    pub id: String,
    /// Key of the implementation in the node registry.
    pub uses: String,
    /// Any JSON, passed to the implementation as is (`null` when absent).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
    /// Where the input comes from; `None` reads `_inputs.<id>`, which the incoming edge wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<NodeInputs>,
    /// Attempts, retry delay, timeout, fallback and join strategy (all optional).
    #[serde(default)]
    pub config: NodeConfig,
}

/// One edge of a blueprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDef {
    /// Id of the node the edge leaves.
    pub source: String,
    /// Id of the node the edge leads to.
    pub target: String,
    /// If set, the edge is taken only when the source's result has this action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Expression over `{...context, result}` that must hold for the edge to be taken
    /// (`None`: always holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Expression over `{input, context}` whose value becomes the target's input (`None`:
    /// the source's output as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

/// The raw blueprint document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlueprintDef {
    /// Blueprint id; jobs and runs refer to it.
    pub id: String,
    /// Free-form; `version` and `cycleEntryPoints` are read.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// The nodes, in document order (node indices refer to it).
    #[serde(default)]
    pub nodes: Vec<NodeDef>,
    /// The edges, in document order (edge indices refer to it).
    #[serde(default)]
    pub edges: Vec<EdgeDef>,
}

/// A validated, analysed blueprint. Node and edge indices refer to `def().nodes` / `def().edges`.
#[derive(Debug, Clone)]
pub struct Blueprint {
    def: BlueprintDef,
    index: HashMap<String, usize>,
    join: Vec<JoinStrategy>,
    start: Vec<usize>,
    terminal: Vec<usize>,
    outgoing: Vec<Vec<usize>>,
    forward_predecessors: Vec<Vec<usize>>,
    /// The nodes in a topological order of the forward edges.
    forward_order: Vec<usize>,
    back_edge: Vec<bool>,
    fallback_of: Vec<Vec<usize>>,
    in_cycle: Vec<bool>,
    may_repeat: Vec<bool>,
    ends: Vec<(usize, usize)>,
    conditions: Vec<Option<Expression>>,
    transforms: Vec<Option<Expression>>,
}

impl Blueprint {
    /// Parses and validates a blueprint from JSON text.
    pub fn from_json(text: &str) -> Result<Blueprint, BlueprintError> {
        let def: BlueprintDef =
            serde_json::from_str(text).map_err(|e| BlueprintError::Malformed {
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            })?;
        Blueprint::new(def)
    }

    /// Reads, parses and validates a blueprint file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Blueprint, BlueprintError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| BlueprintError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Blueprint::from_json(&text).map_err(|e| match e {
            BlueprintError::Malformed {
                line,
                column,
                message,
            } => BlueprintError::Malformed {
                line,
                column,
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// Validates and analyses an already-parsed blueprint document.
    pub fn new(def: BlueprintDef) -> Result<Blueprint, BlueprintError> {
        let id = def.id.clone();
        if id.trim().is_empty() {
            return Err(BlueprintError::invalid("", "blueprint id is empty"));
        }
        // Ids travel in job messages, with room for what the runtime appends to them (a
        // batch worker's `#<index>`).
        check_id("the blueprint id", &id)
            .and_then(|()| bounded(&id))
            .map_err(|problem| BlueprintError::invalid("", problem))?;
        let mut index = HashMap::with_capacity(def.nodes.len());
        for (i, node) in def.nodes.iter().enumerate() {
            if node.id.is_empty() {
                return Err(BlueprintError::invalid(
                    &id,
                    format!("node #{i} has an empty id"),
                ));
            }
            check_id(&format!("node id '{}'", cut_reason(&node.id)), &node.id)
                .and_then(|()| bounded(&node.id))
                .map_err(|problem| BlueprintError::invalid(&id, problem))?;
            if index.insert(node.id.clone(), i).is_some() {
                return Err(BlueprintError::invalid(
                    &id,
                    format!("node id '{}' is used more than once", node.id),
                ));
            }
        }
        let mut join = Vec::with_capacity(def.nodes.len());
        let mut fallback_of = vec![Vec::new(); def.nodes.len()];
        for (i, node) in def.nodes.iter().enumerate() {
            join.push(match node.config.join_strategy.as_deref() {
                None if node.uses == "loop-controller" => JoinStrategy::Any,
                None | Some("all") => JoinStrategy::All,
                Some("any") => JoinStrategy::Any,
                Some(other) => {
                    return Err(BlueprintError::invalid(
                        &id,
                        format!(
                            "node '{}' has unknown joinStrategy '{other}' (expected \"all\" or \"any\")",
                            node.id
                        ),
                    ))
                }
            });
            if let Some(fallback) = &node.config.fallback {
                match index.get(fallback) {
                    Some(&f) => fallback_of[f].push(i),
                    None => {
                        return Err(BlueprintError::invalid(
                            &id,
                            format!(
                                "node '{}' names fallback '{fallback}', which is not a node",
                                node.id
                            ),
                        ))
                    }
                }
            }
        }
        let n = def.nodes.len();
        let mut outgoing = vec![Vec::new(); n];
        let mut incoming_count = vec![0usize; n];
        let mut edge_ends = Vec::with_capacity(def.edges.len());
        for (e, edge) in def.edges.iter().enumerate() {
            let end = |name: &str, role: &str| {
                index.get(name).copied().ok_or_else(|| {
                    BlueprintError::invalid(
                        &id,
                        format!(
                            "edge #{e} ({} -> {}) names {role} '{name}', which is not a node",
                            edge.source, edge.target
                        ),
                    )
                })
            };
            let s = end(&edge.source, "source")?;
            let t = end(&edge.target, "target")?;
            outgoing[s].push(e);
            incoming_count[t] += 1;
            edge_ends.push((s, t));
        }
        let is_fallback: Vec<bool> = fallback_of.iter().map(|v| !v.is_empty()).collect();
        let mut start: Vec<usize> = (0..n)
            .filter(|&i| incoming_count[i] == 0 && !is_fallback[i])
            .collect();
        if start.is_empty() {
            if let Some(entries) = def
                .metadata
                .get("cycleEntryPoints")
                .and_then(Value::as_array)
            {
                for entry in entries {
                    let name = entry.as_str().unwrap_or_default();
                    match index.get(name) {
                        Some(&i) => start.push(i),
                        None => {
                            return Err(BlueprintError::invalid(
                                &id,
                                format!(
                                    "metadata.cycleEntryPoints names '{name}', which is not a node"
                                ),
                            ))
                        }
                    }
                }
            }
        }
        if start.is_empty() && n > 0 {
            return Err(BlueprintError::invalid(
                &id,
                "no start node (every node has an incoming edge); name the cycle's entry in metadata.cycleEntryPoints",
            ));
        }
        let terminal = (0..n).filter(|&i| outgoing[i].is_empty()).collect();
        let back_edge = find_back_edges(n, &start, &outgoing, &edge_ends);
        let mut forward_predecessors = vec![Vec::new(); n];
        for (e, &(s, t)) in edge_ends.iter().enumerate() {
            if !back_edge[e] && !forward_predecessors[t].contains(&s) {
                forward_predecessors[t].push(s);
            }
        }
        let in_cycle = nodes_in_cycles(n, &outgoing, &edge_ends);
        let forward_order = forward_order(&outgoing, &edge_ends, &back_edge);
        let may_repeat = repeating_nodes(&in_cycle, &forward_predecessors, &forward_order);
        // An expression that does not parse is an error of the blueprint, found at load.
        let compile = |text: &Option<String>, what: &str, e: usize| match text {
            None => Ok(None),
            Some(src) => Expression::parse(src).map(Some).map_err(|err| {
                BlueprintError::invalid(
                    &id,
                    format!(
                        "edge #{e} {what} '{}' does not parse: {err}",
                        cut_reason(src)
                    ),
                )
            }),
        };
        let mut conditions = Vec::with_capacity(def.edges.len());
        let mut transforms = Vec::with_capacity(def.edges.len());
        for (e, edge) in def.edges.iter().enumerate() {
            conditions.push(compile(&edge.condition, "condition", e)?);
            transforms.push(compile(&edge.transform, "transform", e)?);
        }
        Ok(Blueprint {
            def,
            index,
            join,
            start,
            terminal,
            outgoing,
            forward_predecessors,
            forward_order,
            back_edge,
            fallback_of,
            in_cycle,
            may_repeat,
            ends: edge_ends,
            conditions,
            transforms,
        })
    }

    /// The blueprint's id.
    pub fn id(&self) -> &str {
        &self.def.id
    }

    /// The raw document.
    pub fn def(&self) -> &BlueprintDef {
        &self.def
    }

    /// `metadata.version` as a string (numbers are rendered), if set.
    pub fn version(&self) -> Option<String> {
        match self.def.metadata.get("version") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        }
    }

    /// Records in a run's context which blueprint (and version) it runs: `blueprintId`,
    /// `blueprintVersion`.
    pub fn stamp(&self, context: &mut serde_json::Map<String, Value>) {
        context.insert("blueprintId".into(), Value::String(self.id().to_string()));
        if let Some(v) = self.version() {
            context.insert("blueprintVersion".into(), Value::String(v));
        }
    }

    /// The blueprint id a run's context was stamped with ([`stamp`](Blueprint::stamp)); empty
    /// when it has none.
    pub fn stamped_id(context: &dyn crate::engine::node::ContextRead) -> &str {
        context
            .get("blueprintId")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// Problems that do not reject the blueprint: none since an unparsable expression is an
    /// error at load; [`lint`](crate::lint) reports what is probably a mistake. Kept for
    /// code written against earlier versions.
    pub fn warnings(&self) -> &[String] {
        &[]
    }

    /// Index of a node by id.
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// A node by index.
    pub fn node(&self, index: usize) -> &NodeDef {
        &self.def.nodes[index]
    }

    /// A node by id.
    pub fn node_by_id(&self, id: &str) -> Option<&NodeDef> {
        self.node_index(id).map(|i| &self.def.nodes[i])
    }

    /// An edge by index.
    pub fn edge(&self, index: usize) -> &EdgeDef {
        &self.def.edges[index]
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.def.nodes.len()
    }

    /// Start node indices.
    pub fn start_nodes(&self) -> &[usize] {
        &self.start
    }

    /// Start node ids, in blueprint order.
    pub fn start_node_ids(&self) -> Vec<&str> {
        self.start
            .iter()
            .map(|&i| self.def.nodes[i].id.as_str())
            .collect()
    }

    /// Terminal node indices (no outgoing edge).
    pub fn terminal_nodes(&self) -> &[usize] {
        &self.terminal
    }

    /// Terminal node ids, in blueprint order.
    pub fn terminal_node_ids(&self) -> Vec<&str> {
        self.terminal
            .iter()
            .map(|&i| self.def.nodes[i].id.as_str())
            .collect()
    }

    /// Outgoing edge indices of a node.
    pub fn outgoing(&self, node: usize) -> &[usize] {
        &self.outgoing[node]
    }

    /// Distinct sources of the forward (non-back) edges into a node: who takes part in its join.
    pub fn forward_predecessors(&self, node: usize) -> &[usize] {
        &self.forward_predecessors[node]
    }

    /// The nodes in a topological order of the forward (non-back) edges: each after all its
    /// forward predecessors.
    pub fn forward_order(&self) -> &[usize] {
        &self.forward_order
    }

    /// Whether the edge closes a cycle (it takes no part in joins).
    pub fn is_back_edge(&self, edge: usize) -> bool {
        self.back_edge[edge]
    }

    /// Whether any cycle exists.
    pub fn has_cycles(&self) -> bool {
        self.back_edge.iter().any(|&b| b)
    }

    /// Whether the node lies on a cycle (it may execute several times in one run).
    pub fn in_cycle(&self, node: usize) -> bool {
        self.in_cycle[node]
    }

    /// Whether the node may execute several times in one run: it lies on a cycle, or
    /// downstream of one (a side branch of a loop body runs once per iteration).
    pub fn may_repeat(&self, node: usize) -> bool {
        self.may_repeat[node]
    }

    /// Whether which edges the node takes depends on the context (a condition on one of its
    /// candidate edges, including those inherited through fallback).
    pub fn has_conditional_successors(&self, node: usize) -> bool {
        std::iter::once(node)
            .chain(self.fallback_of[node].iter().copied())
            .any(|n| {
                self.outgoing[n]
                    .iter()
                    .any(|&e| self.def.edges[e].condition.is_some())
            })
    }

    /// Nodes whose `config.fallback` is this node.
    pub fn fallback_of(&self, node: usize) -> &[usize] {
        &self.fallback_of[node]
    }

    /// Whether `from` alone writes the input of `target`, and only once a run: `target` is
    /// another node, never repeats, stands in for no node, and `from` is its only forward
    /// predecessor.
    pub fn feeds_alone(&self, from: usize, target: usize) -> bool {
        target != from
            && !self.may_repeat(target)
            && self.forward_predecessors(target) == [from]
            && self.fallback_of(target).is_empty()
    }

    /// The join strategy of a node (loop controllers default to `any`).
    pub fn join_strategy(&self, node: usize) -> JoinStrategy {
        self.join[node]
    }

    /// The compiled condition of an edge (None: no condition, or it did not parse).
    pub fn condition(&self, edge: usize) -> Option<&Expression> {
        self.conditions[edge].as_ref()
    }

    /// Whether the edge has a condition text at all.
    pub fn has_condition(&self, edge: usize) -> bool {
        self.def.edges[edge].condition.is_some()
    }

    /// The compiled transform of an edge.
    pub fn transform(&self, edge: usize) -> Option<&Expression> {
        self.transforms[edge].as_ref()
    }

    /// Index of an edge's source and target.
    pub fn edge_ends(&self, edge: usize) -> (usize, usize) {
        self.ends[edge]
    }

    /// A Mermaid flowchart of the blueprint.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart TD\n");
        let safe = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        let label = |s: &str| s.replace('"', "#quot;");
        for node in &self.def.nodes {
            out.push_str(&format!(
                "    {}[\"{}<br/><i>{}</i>\"]\n",
                safe(&node.id),
                label(&node.id),
                label(&node.uses)
            ));
        }
        for edge in &self.def.edges {
            let mut text = Vec::new();
            if let Some(a) = &edge.action {
                text.push(a.clone());
            }
            if let Some(c) = &edge.condition {
                text.push(format!("if {c}"));
            }
            if text.is_empty() {
                out.push_str(&format!(
                    "    {} --> {}\n",
                    safe(&edge.source),
                    safe(&edge.target)
                ));
            } else {
                out.push_str(&format!(
                    "    {} -- \"{}\" --> {}\n",
                    safe(&edge.source),
                    label(&text.join(" ")),
                    safe(&edge.target)
                ));
            }
        }
        for node in &self.def.nodes {
            if let Some(f) = &node.config.fallback {
                out.push_str(&format!(
                    "    {} -. fallback .-> {}\n",
                    safe(&node.id),
                    safe(f)
                ));
            }
        }
        out
    }
}

/// Marks the edges that close a cycle, by an iterative depth-first search from the start
/// nodes (then from any node not yet reached): an edge into a node still on the DFS stack.
fn find_back_edges(
    n: usize,
    start: &[usize],
    outgoing: &[Vec<usize>],
    edge_ends: &[(usize, usize)],
) -> Vec<bool> {
    const WHITE: u8 = 0;
    const GRAY: u8 = 1;
    const BLACK: u8 = 2;
    let mut color = vec![WHITE; n];
    let mut back = vec![false; edge_ends.len()];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let roots = start.iter().copied().chain(0..n);
    for root in roots {
        if color[root] != WHITE {
            continue;
        }
        color[root] = GRAY;
        stack.push((root, 0));
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&e) = outgoing[node].get(*next) {
                *next += 1;
                let target = edge_ends[e].1;
                match color[target] {
                    WHITE => {
                        color[target] = GRAY;
                        stack.push((target, 0));
                    }
                    GRAY => back[e] = true,
                    _ => {}
                }
            } else {
                color[node] = BLACK;
                stack.pop();
            }
        }
    }
    back
}

/// Nodes that may execute several times in one run: those on a cycle, and those whose
/// forward predecessors all may (a side branch of a loop body runs once per iteration). A
/// node that also has a predecessor outside loops (a join after a loop's exit) runs once.
/// Computed in topological order of the forward edges, without recursion.
fn repeating_nodes(
    in_cycle: &[bool],
    forward_predecessors: &[Vec<usize>],
    forward_order: &[usize],
) -> Vec<bool> {
    let mut may = in_cycle.to_vec();
    for &node in forward_order {
        if !may[node] {
            let preds = &forward_predecessors[node];
            may[node] = !preds.is_empty() && preds.iter().all(|&p| may[p]);
        }
    }
    may
}

/// The nodes in a topological order of the forward edges (Kahn's algorithm; back edges
/// close every cycle, so all nodes are ordered).
fn forward_order(
    outgoing: &[Vec<usize>],
    edge_ends: &[(usize, usize)],
    back_edge: &[bool],
) -> Vec<usize> {
    let n = outgoing.len();
    let mut indegree = vec![0usize; n];
    for (e, &(_, t)) in edge_ends.iter().enumerate() {
        if !back_edge[e] {
            indegree[t] += 1;
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(node) = ready.pop() {
        order.push(node);
        for &e in &outgoing[node] {
            if back_edge[e] {
                continue;
            }
            let t = edge_ends[e].1;
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(t);
            }
        }
    }
    order
}

/// Nodes that lie on some cycle: members of a strongly connected component with more than one
/// node, or with a self-loop. Iterative Tarjan.
fn nodes_in_cycles(n: usize, outgoing: &[Vec<usize>], edge_ends: &[(usize, usize)]) -> Vec<bool> {
    let mut in_cycle = vec![false; n];
    for &(s, t) in edge_ends {
        if s == t {
            in_cycle[s] = true;
        }
    }
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut scc_stack = Vec::new();
    let mut counter = 0usize;
    let mut call: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        call.push((root, 0));
        index[root] = counter;
        low[root] = counter;
        counter += 1;
        scc_stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut next)) = call.last_mut() {
            if let Some(&e) = outgoing[v].get(*next) {
                *next += 1;
                let w = edge_ends[e].1;
                if index[w] == usize::MAX {
                    index[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    scc_stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                call.pop();
                if let Some(&(parent, _)) = call.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut members = Vec::new();
                    while let Some(w) = scc_stack.pop() {
                        on_stack[w] = false;
                        members.push(w);
                        if w == v {
                            break;
                        }
                    }
                    if members.len() > 1 {
                        for m in members {
                            in_cycle[m] = true;
                        }
                    }
                }
            }
        }
    }
    in_cycle
}

/// Blueprints by id, shared between threads.
pub type BlueprintSet = HashMap<String, std::sync::Arc<Blueprint>>;

/// Adds blueprints to a set (a later blueprint with the same id replaces the earlier).
pub fn add_blueprints(set: &mut BlueprintSet, blueprints: impl IntoIterator<Item = Blueprint>) {
    for bp in blueprints {
        set.insert(bp.id().to_string(), std::sync::Arc::new(bp));
    }
}

/// Blueprint and node ids leave room for a batch worker's `#<index>` within
/// [`MAX_ID_BYTES`].
pub const MAX_BLUEPRINT_ID_BYTES: usize = MAX_ID_BYTES - 24;

fn bounded(id: &str) -> Result<(), String> {
    if id.len() > MAX_BLUEPRINT_ID_BYTES {
        return Err(format!(
            "the id '{}' is {} bytes long (at most {MAX_BLUEPRINT_ID_BYTES})",
            cut_reason(id),
            id.len()
        ));
    }
    Ok(())
}

/// Loads every `*.json` blueprint in a directory, keyed by blueprint id. Problems are
/// returned per file, so a caller can list them all (`flowcraft check`).
pub fn load_dir(dir: impl AsRef<Path>) -> (BTreeMap<String, Blueprint>, Vec<String>) {
    let dir = dir.as_ref();
    let mut found = BTreeMap::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(format!(
                "cannot read blueprint directory {}: {e}",
                dir.display()
            ));
            return (found, problems);
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("json"))
        .collect();
    paths.sort();
    let mut seen_in: HashMap<String, String> = HashMap::new();
    for path in paths {
        match Blueprint::from_path(&path) {
            Ok(bp) => {
                let file = path.display().to_string();
                if let Some(other) = seen_in.insert(bp.id().to_string(), file.clone()) {
                    problems.push(format!(
                        "{file}: blueprint id '{}' is also defined in {other}",
                        bp.id()
                    ));
                    continue;
                }
                found.insert(bp.id().to_string(), bp);
            }
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    (found, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(json: &str) -> Result<Blueprint, BlueprintError> {
        Blueprint::from_json(json)
    }

    fn err(json: &str) -> String {
        bp(json).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn analyses_a_diamond() {
        let b = bp(
            r#"{"id":"d","nodes":[{"id":"a","uses":"x"},{"id":"b","uses":"x"},
            {"id":"c","uses":"x"},{"id":"j","uses":"x"}],
            "edges":[{"source":"a","target":"b"},{"source":"a","target":"c"},
            {"source":"b","target":"j"},{"source":"c","target":"j"}]}"#,
        )
        .unwrap();
        assert_eq!(b.start_node_ids(), vec!["a"]);
        assert_eq!(b.terminal_node_ids(), vec!["j"]);
        let j = b.node_index("j").unwrap();
        assert_eq!(b.forward_predecessors(j).len(), 2);
        assert!(!b.has_cycles());
        assert_eq!(b.join_strategy(j), JoinStrategy::All);
    }

    #[test]
    fn unknown_fields_are_ignored_and_camel_case_is_read() {
        let b = bp(r#"{"id":"x","extra":1,"nodes":[{"id":"a","uses":"u","foo":2,
            "config":{"maxRetries":3,"retryDelay":5,"timeout":9,"joinStrategy":"any"}}],"edges":[]}"#)
        .unwrap();
        let c = &b.node(0).config;
        assert_eq!(
            (c.max_retries, c.retry_delay, c.timeout),
            (Some(3), Some(5), Some(9))
        );
        assert_eq!(b.join_strategy(0), JoinStrategy::Any);
    }

    #[test]
    fn rejects_duplicate_ids() {
        let e = err(r#"{"id":"x","nodes":[{"id":"a","uses":"u"},{"id":"a","uses":"u"}]}"#);
        assert!(
            e.contains("'x'") && e.contains("'a' is used more than once"),
            "{e}"
        );
    }

    #[test]
    fn rejects_edges_to_missing_nodes() {
        let e = err(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u"}],"edges":[{"source":"a","target":"zz"}]}"#,
        );
        assert!(e.contains("target 'zz'") && e.contains("edge #0"), "{e}");
        let e = err(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u"}],"edges":[{"source":"q","target":"a"}]}"#,
        );
        assert!(e.contains("source 'q'"), "{e}");
    }

    #[test]
    fn rejects_missing_fallback() {
        let e = err(r#"{"id":"x","nodes":[{"id":"a","uses":"u","config":{"fallback":"nope"}}]}"#);
        assert!(
            e.contains("node 'a'") && e.contains("fallback 'nope'"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_join_strategy() {
        let e =
            err(r#"{"id":"x","nodes":[{"id":"a","uses":"u","config":{"joinStrategy":"some"}}]}"#);
        assert!(
            e.contains("node 'a'") && e.contains("joinStrategy 'some'"),
            "{e}"
        );
    }

    #[test]
    fn rejects_graph_without_start_node() {
        let e = err(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"}],
            "edges":[{"source":"a","target":"b"},{"source":"b","target":"a"}]}"#,
        );
        assert!(e.contains("no start node"), "{e}");
        let ok = bp(r#"{"id":"x","metadata":{"cycleEntryPoints":["a"]},
            "nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"}],
            "edges":[{"source":"a","target":"b"},{"source":"b","target":"a"}]}"#)
        .unwrap();
        assert_eq!(ok.start_node_ids(), vec!["a"]);
        assert!(ok.has_cycles());
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let e = bp("{\"id\":\"x\",\n \"nodes\": [ }").err().unwrap();
        match e {
            BlueprintError::Malformed { line, column, .. } => {
                assert_eq!(line, 2);
                assert!(column > 1);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn fallback_nodes_are_not_start_nodes() {
        let b = bp(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u","config":{"fallback":"f"}},
            {"id":"f","uses":"u"}]}"#,
        )
        .unwrap();
        assert_eq!(b.start_node_ids(), vec!["a"]);
        assert_eq!(b.fallback_of(1), &[0]);
    }

    #[test]
    fn loop_back_edge_is_found_and_excluded_from_joins() {
        let b = bp(
            r#"{"id":"l","nodes":[{"id":"init","uses":"u"},{"id":"body","uses":"u"},
            {"id":"ctl","uses":"loop-controller"},{"id":"done","uses":"u"}],
            "edges":[{"source":"init","target":"body"},{"source":"body","target":"ctl"},
            {"source":"ctl","target":"body","action":"continue"},
            {"source":"ctl","target":"done","action":"break"}]}"#,
        )
        .unwrap();
        assert!(b.is_back_edge(2));
        assert!(!b.is_back_edge(0));
        let body = b.node_index("body").unwrap();
        assert_eq!(b.forward_predecessors(body), &[0]);
        assert!(b.in_cycle(body));
        assert!(!b.in_cycle(0));
        let done = b.node_index("done").unwrap();
        assert!(!b.in_cycle(done) && b.may_repeat(done));
        assert!(!b.may_repeat(0));
        // A join of a loop's exit with a branch outside the loop runs once.
        let joined = bp(r#"{"id":"l2","nodes":[{"id":"init","uses":"u"},{"id":"body","uses":"u"},
            {"id":"ctl","uses":"loop-controller"},{"id":"other","uses":"u"},{"id":"done","uses":"u"},{"id":"after","uses":"u"}],
            "edges":[{"source":"init","target":"body"},{"source":"init","target":"other"},{"source":"body","target":"ctl"},
            {"source":"ctl","target":"body","action":"continue"},{"source":"ctl","target":"done","action":"break"},
            {"source":"other","target":"done"},{"source":"done","target":"after"}]}"#)
        .unwrap();
        for id in ["done", "after", "other", "init"] {
            assert!(!joined.may_repeat(joined.node_index(id).unwrap()), "{id}");
        }
        assert!(joined.may_repeat(joined.node_index("body").unwrap()));
        assert_eq!(b.join_strategy(2), JoinStrategy::Any);
    }

    #[test]
    fn deep_chain_analysis_does_not_overflow_the_stack() {
        let n = 100_000;
        let mut def = BlueprintDef {
            id: "deep".into(),
            metadata: Map::new(),
            nodes: Vec::with_capacity(n),
            edges: Vec::with_capacity(n),
        };
        for i in 0..n {
            def.nodes.push(NodeDef {
                id: format!("n{i}"),
                uses: "u".into(),
                params: Value::Null,
                inputs: None,
                config: NodeConfig::default(),
            });
            if i > 0 {
                def.edges.push(EdgeDef {
                    source: format!("n{}", i - 1),
                    target: format!("n{i}"),
                    action: None,
                    condition: None,
                    transform: None,
                });
            }
        }
        // Close a cycle at the end too, so both DFS passes walk the full depth.
        def.edges.push(EdgeDef {
            source: format!("n{}", n - 1),
            target: "n1".into(),
            action: None,
            condition: None,
            transform: None,
        });
        let b = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                Blueprint::new(def)
                    .map(|b| (b.start_node_ids().len(), b.has_cycles(), b.in_cycle(5)))
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(b, (1, true, true));
    }

    #[test]
    fn ids_are_bounded_to_fit_job_messages() {
        let long = "n".repeat(MAX_BLUEPRINT_ID_BYTES + 1);
        let node = format!(r#"{{"id":"x","nodes":[{{"id":"{long}","uses":"u"}}]}}"#);
        assert!(bp(&node).unwrap_err().to_string().contains("bytes long"));
        let id = format!(r#"{{"id":"{long}","nodes":[{{"id":"a","uses":"u"}}]}}"#);
        assert!(bp(&id).is_err());
        let control = r#"{"id":"x","nodes":[{"id":"a","uses":"u"}]}"#;
        assert!(bp(control).unwrap_err().to_string().contains("control"));
    }

    #[test]
    fn an_unparsable_condition_is_an_error_of_the_blueprint() {
        let err = bp(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u"},{"id":"b","uses":"u"}],
            "edges":[{"source":"a","target":"b","condition":"a ==="}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("edge #0 condition 'a ===' does not parse"),
            "{err}"
        );
    }

    #[test]
    fn mermaid_lists_nodes_and_edges() {
        let b = bp(
            r#"{"id":"x","nodes":[{"id":"a","uses":"u"},{"id":"b-1","uses":"u"}],
            "edges":[{"source":"a","target":"b-1","action":"ok"}]}"#,
        )
        .unwrap();
        let m = b.to_mermaid();
        assert!(m.starts_with("flowchart TD"));
        assert!(m.contains("a -- \"ok\" --> b_1"), "{m}");
    }
}
