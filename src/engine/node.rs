//! The node API: what an implementation receives, what it returns, and the registry that maps
//! a blueprint's `uses` to code.
//!
//! A node reads its run's context through a [`ContextView`]: reads see the job's snapshot plus
//! the node's own writes; writes are recorded as [`ContextDeltas`] that the runtime applies
//! atomically together with the node's output. Implementations are [`Node`] trait objects or
//! plain closures:
//!
//! ```
//! use flowcraft_rabbitmq::node::{NodeRegistry, NodeResult};
//! let mut registry = NodeRegistry::new();
//! registry.register_fn("double", |ctx| {
//!     let n = ctx.input.as_i64().unwrap_or(0);
//!     ctx.context.set("last_doubled", serde_json::json!(n));
//!     Ok(NodeResult::output(serde_json::json!(n * 2)))
//! });
//! assert!(registry.get("double").is_some());
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::expr::Scope;

/// A run's context as a flat JSON object (`_outputs.n1` is one key).
pub type ContextMap = Map<String, Value>;

/// What a node returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResult {
    /// The node's output, stored at `_outputs.<nodeId>`.
    #[serde(default)]
    pub output: Value,
    /// Selects the outgoing edges whose `action` equals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Nodes created at run time (batch workers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dynamic_nodes: Vec<DynamicNode>,
    /// Set by pausing nodes (`wait`, `sleep`, `webhook`, `subflow`): the run awaits this node,
    /// and the value becomes `_awaitingDetails.<nodeId>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Value>,
}

impl NodeResult {
    /// A result with only an output.
    pub fn output(output: Value) -> NodeResult {
        NodeResult {
            output,
            ..NodeResult::default()
        }
    }

    /// Sets the action.
    pub fn with_action(mut self, action: impl Into<String>) -> NodeResult {
        self.action = Some(action.into());
        self
    }

    /// A result that pauses the run at this node.
    pub fn awaiting(details: Value) -> NodeResult {
        NodeResult {
            awaiting: Some(details),
            ..NodeResult::default()
        }
    }

    /// `{"output": …, "action": …}`: the `result` seen by edge conditions.
    pub fn to_condition_value(&self) -> Value {
        let mut m = Map::with_capacity(2);
        m.insert("output".into(), self.output.clone());
        m.insert(
            "action".into(),
            self.action
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        Value::Object(m)
    }
}

/// A node created at run time by a node result (a batch worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DynamicNode {
    /// Node id; a batch worker's is `<gatherNodeId>#<index>`.
    pub id: String,
    /// Key of the implementation in the node registry.
    pub uses: String,
    /// Params given to the implementation (a batch worker's are the scatter's `workerParams`).
    #[serde(default)]
    pub params: Value,
    /// The node's item; the runtimes read the input from `_inputs.<id>`, which the creating
    /// node writes too.
    #[serde(default)]
    pub input: Value,
}

/// An error from a node. Any `std::error::Error` converts into it with `?`; a fatal error
/// skips the remaining attempts and the fallback.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeError {
    message: String,
    fatal: bool,
}

impl NodeError {
    /// A retryable error.
    pub fn new(message: impl Into<String>) -> NodeError {
        NodeError {
            message: message.into(),
            fatal: false,
        }
    }

    /// An error that is not retried and has no fallback.
    pub fn fatal(message: impl Into<String>) -> NodeError {
        NodeError {
            message: message.into(),
            fatal: true,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the error is fatal.
    pub fn is_fatal(&self) -> bool {
        self.fatal
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for NodeError {
    fn from(e: E) -> NodeError {
        NodeError::new(e.to_string())
    }
}

/// Context writes of one node: key → new value, or `None` for a deletion. Ordered, so the
/// last write of a key wins and application is deterministic; indexed, so a node that writes
/// many keys (a batch's scatter) pays the same per key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContextDeltas {
    entries: Vec<(String, Option<Value>)>,
    /// The position of each key in `entries`.
    index: HashMap<String, usize>,
}

impl ContextDeltas {
    /// Records a write.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.put(key.into(), Some(value));
    }

    /// Records a deletion.
    pub fn delete(&mut self, key: impl Into<String>) {
        self.put(key.into(), None);
    }

    fn put(&mut self, key: String, value: Option<Value>) {
        match self.index.get(&key) {
            Some(&at) => self.entries[at].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    /// The latest write of a key: `Some(Some(v))` set, `Some(None)` deleted, `None` untouched.
    pub fn get(&self, key: &str) -> Option<Option<&Value>> {
        self.index.get(key).map(|&at| self.entries[at].1.as_ref())
    }

    /// Iterates over the writes in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&Value>)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies the writes of `other` on top of this one's: a key written in both takes
    /// `other`'s value, at its first position.
    pub fn extend(&mut self, other: ContextDeltas) {
        for (k, v) in other.entries {
            self.put(k, v);
        }
    }

    /// Applies the writes to a context map.
    pub fn apply_to(&self, context: &mut ContextMap) {
        for (k, v) in &self.entries {
            match v {
                Some(v) => {
                    context.insert(k.clone(), v.clone());
                }
                None => {
                    context.remove(k);
                }
            }
        }
    }

    /// The writes as a JSON object (`null` marks deletions); used by `exec` and the CLI.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or(Value::Null)))
                .collect(),
        )
    }
}

/// Read access to a run's context, key by key: a whole map, or a view that fetches the keys
/// it reads (see [`LazyKeys`]).
pub trait ContextRead {
    /// A key's value (`None` if absent).
    fn get(&self, key: &str) -> Option<&Value>;

    /// Whether a key is present.
    fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The whole context as one JSON object (costly: expressions that name `context` itself).
    fn to_value(&self) -> Value;
}

impl ContextRead for ContextMap {
    fn get(&self, key: &str) -> Option<&Value> {
        Map::get(self, key)
    }

    fn to_value(&self) -> Value {
        Value::Object(self.clone())
    }
}

/// Where a [`LazyKeys`] fetches the keys of a run that its snapshot lacks (the distributed
/// worker's is the run's rows in PostgreSQL).
pub trait KeyLoader: Send + Sync {
    /// The values of `keys`, in order (`None`: absent).
    fn load(&self, keys: &[String]) -> Result<Vec<Option<Value>>, String>;

    /// The whole context.
    fn load_all(&self) -> Result<ContextMap, String>;
}

/// The keys of a run that a job reads beyond the snapshot it was given, fetched on first
/// read and kept for the rest of the job: so a job reads what it uses, not the whole run.
///
/// A failed fetch reads as absent and is remembered ([`error`](LazyKeys::error)); the
/// job must check it before it commits anything decided from those reads.
pub struct LazyKeys {
    loader: Box<dyn KeyLoader>,
    fetched: elsa::sync::FrozenMap<String, Box<Option<Value>>>,
    error: std::sync::OnceLock<String>,
}

impl fmt::Debug for LazyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyKeys")
            .field("error", &self.error.get())
            .finish_non_exhaustive()
    }
}

impl LazyKeys {
    /// Keys fetched from `loader`.
    pub fn new(loader: impl KeyLoader + 'static) -> LazyKeys {
        LazyKeys {
            loader: Box::new(loader),
            fetched: elsa::sync::FrozenMap::new(),
            error: std::sync::OnceLock::new(),
        }
    }

    /// Records keys read already and found absent (those a snapshot was loaded with and
    /// lacks), so that reading them fetches nothing.
    pub fn absent<K: Into<String>>(self, keys: impl IntoIterator<Item = K>) -> LazyKeys {
        for key in keys {
            let key = key.into();
            if self.fetched.get(&key).is_none() {
                self.fetched.insert(key, Box::new(None));
            }
        }
        self
    }

    /// A key's value, fetched on the first read.
    pub fn get(&self, key: &str) -> Option<&Value> {
        if let Some(value) = self.fetched.get(key) {
            return value.as_ref();
        }
        self.prefetch(&[key]);
        self.fetched.get(key).and_then(Option::as_ref)
    }

    /// Fetches the keys not fetched yet, in one request.
    pub fn prefetch<K: AsRef<str>>(&self, keys: &[K]) {
        let mut missing: Vec<String> = keys
            .iter()
            .map(AsRef::as_ref)
            .filter(|k| self.fetched.get(*k).is_none())
            .map(String::from)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return;
        }
        match self.loader.load(&missing) {
            Ok(values) => {
                for (key, value) in missing.into_iter().zip(values) {
                    self.fetched.insert(key, Box::new(value));
                }
            }
            Err(e) => {
                let _ = self.error.set(e);
                // Read as absent from now on (the job fails before it commits).
                for key in missing {
                    self.fetched.insert(key, Box::new(None));
                }
            }
        }
    }

    /// The whole context, read now.
    pub fn whole(&self) -> ContextMap {
        self.loader.load_all().unwrap_or_else(|e| {
            let _ = self.error.set(e);
            ContextMap::new()
        })
    }

    /// The first fetch that failed, if one did.
    pub fn error(&self) -> Option<&str> {
        self.error.get().map(String::as_str)
    }
}

/// A node's view of its run's context: the snapshot it was started with plus its own writes;
/// in the distributed worker, the snapshot holds the keys the job was expected to read and
/// the rest are fetched on first read ([`LazyKeys`]).
#[derive(Debug, Clone)]
pub struct ContextView {
    snapshot: Arc<ContextMap>,
    lazy: Option<Arc<LazyKeys>>,
    deltas: ContextDeltas,
}

impl ContextView {
    /// A view over a snapshot, with no writes yet.
    pub fn new(snapshot: Arc<ContextMap>) -> ContextView {
        ContextView {
            snapshot,
            lazy: None,
            deltas: ContextDeltas::default(),
        }
    }

    /// A view over part of a run's context: `snapshot`, and what `lazy` fetches on demand.
    pub fn with_lazy(snapshot: Arc<ContextMap>, lazy: Option<Arc<LazyKeys>>) -> ContextView {
        ContextView {
            snapshot,
            lazy,
            deltas: ContextDeltas::default(),
        }
    }

    /// Reads a key (own writes first).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self.deltas.get(key) {
            Some(v) => v,
            None => match (self.snapshot.get(key), &self.lazy) {
                (Some(v), _) => Some(v),
                (None, Some(lazy)) => lazy.get(key),
                (None, None) => None,
            },
        }
    }

    /// Records several writes (in order).
    pub fn apply(&mut self, deltas: &ContextDeltas) {
        for (k, v) in deltas.iter() {
            match v {
                Some(v) => self.set(k, v.clone()),
                None => self.delete(k),
            }
        }
    }

    /// Fetches, in one request, the keys about to be read that the view lacks (a gather's
    /// worker outputs); nothing to do for a view over a whole context.
    pub fn prefetch<K: AsRef<str>>(&self, keys: &[K]) {
        if let Some(lazy) = &self.lazy {
            let missing: Vec<&str> = keys
                .iter()
                .map(AsRef::as_ref)
                .filter(|k| self.deltas.get(k).is_none() && !self.snapshot.contains_key(*k))
                .collect();
            lazy.prefetch(&missing);
        }
    }

    /// The keys fetched on demand, if the view fetches any.
    pub fn lazy(&self) -> Option<&Arc<LazyKeys>> {
        self.lazy.as_ref()
    }

    /// Writes a key.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.deltas.set(key, value);
    }

    /// Whether a key is present.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Deletes a key.
    pub fn delete(&mut self, key: impl Into<String>) {
        self.deltas.delete(key);
    }

    /// The writes made so far.
    pub fn deltas(&self) -> &ContextDeltas {
        &self.deltas
    }

    /// Takes the writes made so far.
    pub fn into_deltas(self) -> ContextDeltas {
        self.deltas
    }

    /// The snapshot this view started from.
    pub fn snapshot(&self) -> &Arc<ContextMap> {
        &self.snapshot
    }

    /// The whole context as one JSON object (snapshot with writes applied).
    pub fn to_json(&self) -> Value {
        let mut map = match &self.lazy {
            Some(lazy) => {
                // What the job loaded wins: it sees one consistent view.
                let mut whole = lazy.whole();
                for (k, v) in self.snapshot.iter() {
                    whole.insert(k.clone(), v.clone());
                }
                whole
            }
            None => (*self.snapshot).clone(),
        };
        self.deltas.apply_to(&mut map);
        Value::Object(map)
    }
}

impl ContextRead for ContextView {
    fn get(&self, key: &str) -> Option<&Value> {
        ContextView::get(self, key)
    }

    fn to_value(&self) -> Value {
        self.to_json()
    }
}

impl Scope for ContextView {
    fn lookup(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }
}

/// A node's context as the name `context` of an expression's scope: `context.items`,
/// `context._outputs.n1.total` (the flat key `_outputs.n1`) and `context['_outputs.n1']` read
/// that key from the view; the whole context is built (once) only for an expression that
/// names `context` itself — so evaluating costs what it reads, not the size of the run.
pub struct ContextScope<'a> {
    context: &'a dyn ContextRead,
    whole: std::sync::OnceLock<Value>,
}

impl<'a> ContextScope<'a> {
    /// `context` as the name `context`.
    pub fn new(context: &'a dyn ContextRead) -> ContextScope<'a> {
        ContextScope {
            context,
            whole: std::sync::OnceLock::new(),
        }
    }

    /// `context` and `context.<key>`; `None` for any other name.
    pub fn lookup_context(&self, key: &str) -> Option<&Value> {
        if key == "context" {
            return Some(self.whole.get_or_init(|| self.context.to_value()));
        }
        self.context.get(key.strip_prefix("context.")?)
    }

    /// The context's own keys, as names (`_outputs.body < 3` in a loop condition).
    pub fn view(&self) -> &'a dyn ContextRead {
        self.context
    }
}

/// A cancellation signal an attempt can poll; raised when the attempt timed out, or when
/// its run was cancelled (an attempt's flag is a [`child`](CancelFlag::child) of its run's).
#[derive(Debug, Clone, Default)]
pub struct CancelFlag {
    own: Arc<AtomicBool>,
    /// The flags it is a child of, nearest first (raising any raises this one).
    ancestors: Vec<Arc<AtomicBool>>,
}

impl CancelFlag {
    /// A flag that is not raised.
    pub fn new() -> CancelFlag {
        CancelFlag::default()
    }

    /// A flag raised with this one (or any it is a child of), or on its own.
    pub fn child(&self) -> CancelFlag {
        CancelFlag {
            own: Arc::new(AtomicBool::new(false)),
            ancestors: std::iter::once(self.own.clone())
                .chain(self.ancestors.iter().cloned())
                .collect(),
        }
    }

    /// Raises the flag (and its children's).
    pub fn cancel(&self) {
        self.own.store(true, Ordering::SeqCst);
    }

    /// Whether the flag, or one it is a child of, is raised.
    pub fn is_cancelled(&self) -> bool {
        self.own.load(Ordering::SeqCst) || self.ancestors.iter().any(|a| a.load(Ordering::SeqCst))
    }
}

/// Everything a node implementation receives for one attempt.
#[derive(Debug)]
pub struct NodeContext {
    /// The resolved input: `_inputs.<nodeId>`, or the node's `inputs` sources.
    pub input: Value,
    /// The node's `params` from the blueprint (`null` when absent).
    pub params: Value,
    /// The run's context: the job's snapshot plus this attempt's own writes.
    pub context: ContextView,
    /// Id of the run the attempt belongs to.
    pub run_id: String,
    /// Id of the node being executed.
    pub node_id: String,
    /// Id of the blueprint the node belongs to.
    pub blueprint_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Raised when the attempt's `timeout` has passed; long-running nodes should poll it.
    pub cancel: CancelFlag,
}

/// A node implementation.
pub trait Node: Send + Sync + 'static {
    /// Runs one attempt.
    fn execute(&self, ctx: &mut NodeContext) -> Result<NodeResult, NodeError>;
}

impl<F> Node for F
where
    F: Fn(&mut NodeContext) -> Result<NodeResult, NodeError> + Send + Sync + 'static,
{
    fn execute(&self, ctx: &mut NodeContext) -> Result<NodeResult, NodeError> {
        self(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    /// A loader over a map that records each request.
    struct Recording {
        context: ContextMap,
        requests: Arc<Mutex<Vec<Vec<String>>>>,
        fails: bool,
    }

    impl KeyLoader for Recording {
        fn load(&self, keys: &[String]) -> Result<Vec<Option<Value>>, String> {
            self.requests.lock().unwrap().push(keys.to_vec());
            if self.fails {
                return Err("connection refused".into());
            }
            Ok(keys.iter().map(|k| self.context.get(k).cloned()).collect())
        }

        fn load_all(&self) -> Result<ContextMap, String> {
            Ok(self.context.clone())
        }
    }

    fn lazy_view(fails: bool) -> (ContextView, Arc<Mutex<Vec<Vec<String>>>>) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let context = json!({"a": 1, "b": 2, "c": 3, "known": 0});
        let loader = Recording {
            context: context.as_object().cloned().unwrap(),
            requests: requests.clone(),
            fails,
        };
        let snapshot: ContextMap = json!({"known": 0}).as_object().cloned().unwrap();
        let lazy = LazyKeys::new(loader).absent(["gone"]);
        let view = ContextView::with_lazy(Arc::new(snapshot), Some(Arc::new(lazy)));
        (view, requests)
    }

    #[test]
    fn a_lazy_view_fetches_each_missing_key_once_and_nothing_it_was_loaded_with() {
        let (view, requests) = lazy_view(false);
        assert_eq!(view.get("known"), Some(&json!(0)));
        assert_eq!(view.get("gone"), None);
        assert!(requests.lock().unwrap().is_empty());
        assert_eq!(view.get("a"), Some(&json!(1)));
        assert_eq!(view.get("a"), Some(&json!(1)));
        assert_eq!(view.get("missing"), None);
        assert_eq!(view.get("missing"), None);
        view.prefetch(&["a", "b", "c", "known"]);
        assert_eq!(
            (view.get("b"), view.get("c")),
            (Some(&json!(2)), Some(&json!(3)))
        );
        assert_eq!(
            *requests.lock().unwrap(),
            [
                vec!["a".to_string()],
                vec!["missing".into()],
                vec!["b".into(), "c".into()]
            ]
        );
        assert_eq!(view.lazy().and_then(|l| l.error()), None);
        assert_eq!(view.to_json(), json!({"a": 1, "b": 2, "c": 3, "known": 0}));
    }

    #[test]
    fn a_failed_fetch_reads_as_absent_and_is_remembered() {
        let (view, requests) = lazy_view(true);
        assert_eq!(view.get("a"), None);
        assert_eq!(view.get("a"), None);
        assert_eq!(requests.lock().unwrap().len(), 1);
        assert_eq!(
            view.lazy().and_then(|l| l.error()),
            Some("connection refused")
        );
    }

    #[test]
    fn a_flag_is_raised_with_any_it_descends_from() {
        let run = CancelFlag::new();
        let attempt = run.child();
        let nested = attempt.child();
        assert!(!nested.is_cancelled());
        run.cancel();
        assert!(attempt.is_cancelled() && nested.is_cancelled());
        let own = CancelFlag::new().child();
        own.cancel();
        assert!(own.is_cancelled());
    }

    #[test]
    fn view_reads_own_writes_over_snapshot() {
        let mut snap = ContextMap::new();
        snap.insert("a".into(), json!(1));
        snap.insert("b".into(), json!(2));
        let mut view = ContextView::new(Arc::new(snap));
        view.set("a", json!(10));
        view.delete("b");
        view.set("c", json!(3));
        assert_eq!(view.get("a"), Some(&json!(10)));
        assert!(!view.has("b"));
        assert_eq!(view.get("c"), Some(&json!(3)));
        assert_eq!(view.to_json(), json!({"a": 10, "c": 3}));
        assert_eq!(view.snapshot().get("a"), Some(&json!(1)));
    }

    #[test]
    fn deltas_keep_last_write_per_key() {
        let mut d = ContextDeltas::default();
        d.set("k", json!(1));
        d.set("k", json!(2));
        d.delete("z");
        assert_eq!(d.iter().count(), 2);
        assert_eq!(d.get("k"), Some(Some(&json!(2))));
        assert_eq!(d.get("z"), Some(None));
        let mut m = ContextMap::new();
        m.insert("z".into(), json!(0));
        d.apply_to(&mut m);
        assert_eq!(Value::Object(m), json!({"k": 2}));
    }

    #[test]
    fn std_errors_convert_and_fatal_is_kept() {
        fn parse(s: &str) -> Result<i64, NodeError> {
            Ok(s.parse::<i64>()?)
        }
        let e = parse("x").unwrap_err();
        assert!(!e.is_fatal());
        assert!(e.message().contains("invalid digit"));
        assert!(NodeError::fatal("stop").is_fatal());
    }

    #[test]
    fn result_serializes_camel_case() {
        let r = NodeResult::output(json!(1)).with_action("ok");
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"output": 1, "action": "ok"})
        );
    }
}
