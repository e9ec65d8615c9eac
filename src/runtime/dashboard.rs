//! The read-only dashboard: server-rendered HTML and SVG pages over the runs' tables and the
//! dead-letter queue, served by the crate's own [`HttpServer`]. No script and no asset is
//! fetched from anywhere: every page is one self-contained document.
//!
//! | page | shows |
//! | --- | --- |
//! | `/` | runs by status (a count per status), the newest runs, throughput over the last 30 minutes, the dead-letter queue's depth |
//! | `/runs/<status>` and `/runs/<status>/<blueprintId>` | the same, filtered (`<status>` may be `all`) |
//! | `/run/<runId>` | the run's blueprint as a graph, each node coloured by its state; its timeline and node executions |
//! | `/dead-letters` | the dead-letter queue's depth and its latest messages |
//!
//! With a token, every page needs `Authorization: Bearer <token>`, or the path prefix
//! `/t/<token>` for a browser (the pages' links keep the prefix); anything else is `401`.
//!
//! A node's state on the run page comes from the run's context and status, refined by its
//! history ([`node_states`]). The rendering is pure functions of what was read, and every
//! value that comes from data (ids, errors, messages) is escaped.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use amiquip::AmqpValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::engine::blueprint::{Blueprint, JoinStrategy};
use crate::runtime::error::{Error, Result};
use crate::services::http::{HttpLimits, HttpServer, Request, Response};
use crate::services::postgres::history::{NodeExecution, RunFilter, RunSummary};
use crate::services::postgres::store::{RunStore, StatusRow};
use crate::services::rabbitmq::{self as amqp, AmqpError, DEAD_LETTER_REASON_HEADER};
use crate::services::url::percent_decode;
use crate::vocabulary::keys::{output_key, AWAITING_DETAILS, BLUEPRINT_ID, BLUEPRINT_VERSION};
use crate::vocabulary::RunStatus;

/// The address the dashboard listens on unless told otherwise: this host only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";
/// Runs listed on the runs page, newest first.
pub const RUNS_SHOWN: i64 = 100;
/// Minutes of throughput drawn.
pub const THROUGHPUT_MINUTES: u32 = 30;
/// Dead letters shown at most.
pub const DEAD_LETTERS_SHOWN: usize = 10;
/// Dead letters looked at at most to find the latest (a queue is read from its head).
pub const DEAD_LETTERS_SCANNED: usize = 200;
/// Bytes of a dead letter's body shown at most.
pub const DEAD_LETTER_BODY_SHOWN: usize = 2048;
/// Executions drawn on a run's timeline at most.
const TIMELINE_SHOWN: usize = 300;
/// Seconds between reloads of a page that changes (the runs, a run that has not ended).
const REFRESH_SECS: u32 = 10;

/// What the dashboard reads and how it is guarded.
pub struct DashboardOptions {
    /// Where runs, statuses and histories are read.
    pub store: RunStore,
    /// RabbitMQ URL, for the dead-letter queue.
    pub amqp_url: String,
    /// The job queue (its dead-letter queue is `<queue>.dead`).
    pub queue: String,
    /// Blueprints by id: a run's graph is drawn from its blueprint.
    pub blueprints: BTreeMap<String, Blueprint>,
    /// When set, every request must carry it (see the module docs).
    pub token: Option<String>,
}

/// A running dashboard.
pub struct DashboardServer {
    server: HttpServer,
}

impl DashboardServer {
    /// Listens on `addr` (port 0 picks a free port) and serves the pages.
    pub fn start(addr: &str, options: DashboardOptions) -> Result<DashboardServer> {
        let dashboard = Dashboard { options };
        let server = HttpServer::start(
            addr,
            "flowcraft-dashboard",
            HttpLimits {
                max_body: 0,
                threads: 4,
                ..HttpLimits::default()
            },
            Arc::new(move |request: &Request| dashboard.answer(request)),
        )
        .map_err(|source| Error::Listen {
            what: "the dashboard",
            addr: addr.to_string(),
            source,
        })?;
        log::info!("dashboard listening on http://{}", server.local_addr());
        Ok(DashboardServer { server })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops accepting requests and waits for the handler threads.
    pub fn stop(self) {
        self.server.stop();
    }
}

struct Dashboard {
    options: DashboardOptions,
}

/// What a request may see.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    /// Serve `rest`; the pages' links start with `base` (the `/t/<token>` prefix, or empty).
    Granted { base: String, rest: String },
    /// No token, or the wrong one.
    Denied,
}

/// Whether a request may see the dashboard: with no token configured, always; with one,
/// when its `Authorization` header is `Bearer <token>` or its path starts `/t/<token>`.
fn authorize(token: Option<&str>, path: &str, authorization: Option<&str>) -> Access {
    let Some(token) = token else {
        return Access::Granted {
            base: String::new(),
            rest: path.to_string(),
        };
    };
    if let Some(after) = path.strip_prefix("/t/") {
        let (segment, rest) = match after.find('/') {
            Some(i) => after.split_at(i),
            None => (after, "/"),
        };
        if same_secret(&percent_decode(segment), token) {
            return Access::Granted {
                base: format!("/t/{segment}"),
                rest: rest.to_string(),
            };
        }
        return Access::Denied;
    }
    let bearer = authorization.and_then(|value| {
        let (scheme, credentials) = value.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| credentials.trim())
    });
    match bearer {
        Some(given) if same_secret(given, token) => Access::Granted {
            base: String::new(),
            rest: path.to_string(),
        },
        _ => Access::Denied,
    }
}

/// Compares two secrets in time independent of where they differ (their digests are
/// compared whole).
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Dashboard {
    fn answer(&self, request: &Request) -> Response {
        if request.method != "GET" {
            return html(405, &message_page("", "Method not allowed", "Use GET."));
        }
        let token = self.options.token.as_deref();
        let (base, rest) = match authorize(token, &request.path, request.header("authorization")) {
            Access::Granted { base, rest } => (base, rest),
            Access::Denied => {
                return html(
                    401,
                    &message_page(
                        "",
                        "Unauthorized",
                        "This dashboard needs its token: send Authorization: Bearer <token>, \
                         or open /t/<token>/ in a browser.",
                    ),
                )
            }
        };
        let segments: Vec<String> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let page = match segments.as_slice() {
            [] => self.runs_page(&base, None, None),
            ["runs", status] => self.runs_filtered(&base, status, None),
            ["runs", status, blueprint] => self.runs_filtered(&base, status, Some(blueprint)),
            ["run", run] => self.run_page(&base, run),
            ["dead-letters"] => Ok(Some(self.dead_letters_page(&base))),
            _ => Ok(None),
        };
        match page {
            Ok(Some(body)) => html(200, &body),
            Ok(None) => html(
                404,
                &message_page(&base, "Not found", "There is no such page here."),
            ),
            Err(e) => {
                log::warn!("dashboard: {} failed: {e}", request.path);
                html(
                    500,
                    &message_page(&base, "The page could not be read", &e.to_string()),
                )
            }
        }
    }

    fn runs_filtered(
        &self,
        base: &str,
        status: &str,
        blueprint: Option<&str>,
    ) -> Result<Option<String>> {
        let status = match status {
            "all" => None,
            other => match RunStatus::parse(other) {
                Some(s) => Some(s),
                None => return Ok(None),
            },
        };
        self.runs_page(base, status, blueprint)
    }

    fn runs_page(
        &self,
        base: &str,
        status: Option<RunStatus>,
        blueprint: Option<&str>,
    ) -> Result<Option<String>> {
        let store = &self.options.store;
        let counts = store.count_by_status()?;
        let runs = store.list_runs(&RunFilter {
            status,
            blueprint_id: blueprint.map(String::from),
            limit: RUNS_SHOWN,
        })?;
        let throughput = store
            .executions_per_minute(THROUGHPUT_MINUTES)
            .map_err(|e| e.to_string());
        let dead_letters = dead_letter_depth(&self.options.amqp_url, &self.options.queue);
        let view = RunsView {
            counts,
            status,
            blueprint: blueprint.map(String::from),
            runs,
            blueprints: self.options.blueprints.keys().cloned().collect(),
            throughput,
            dead_letters,
            queue: self.options.queue.clone(),
        };
        Ok(Some(render_runs(base, &view)))
    }

    fn run_page(&self, base: &str, run: &str) -> Result<Option<String>> {
        let store = &self.options.store;
        let status = store.status(run)?;
        let context = store.load(run)?.map(|s| s.context);
        if status.is_none() && context.is_none() {
            return Ok(None);
        }
        let context = context.unwrap_or_default();
        let history = store.history(run)?;
        let blueprint_id = context
            .get(BLUEPRINT_ID)
            .and_then(Value::as_str)
            .map(String::from);
        let blueprint = blueprint_id
            .as_deref()
            .and_then(|id| self.options.blueprints.get(id));
        let view = RunView {
            run_id: run.to_string(),
            status,
            context,
            history,
            blueprint_id,
            blueprint,
        };
        Ok(Some(render_run(base, &view)))
    }

    fn dead_letters_page(&self, base: &str) -> String {
        let queue = amqp::dead_letter_queue(&self.options.queue);
        let peek = peek_dead_letters(&self.options.amqp_url, &queue, DEAD_LETTERS_SCANNED)
            .map_err(|e| e.to_string());
        render_dead_letters(base, &queue, &peek)
    }
}

fn html(status: u16, body: &str) -> Response {
    Response {
        status,
        content_type: "text/html; charset=utf-8".into(),
        body: body.as_bytes().to_vec(),
    }
}

// ---------------------------------------------------------------------------------------
// Reading the dead-letter queue.

/// One dead letter, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq)]
struct DeadLetter {
    /// Why it was dead-lettered (the `x-flowcraft-reason` header).
    reason: Option<String>,
    /// The body's first [`DEAD_LETTER_BODY_SHOWN`] bytes, as text.
    body: String,
    /// The body's whole length.
    bytes: usize,
    /// The run and node its body names, when it is a job.
    run_id: Option<String>,
    node_id: Option<String>,
    /// Its AMQP timestamp (seconds since the epoch), if it has one.
    timestamp: Option<u64>,
}

impl DeadLetter {
    fn of(body: &[u8], properties: &amiquip::AmqpProperties) -> DeadLetter {
        let reason = properties
            .headers()
            .as_ref()
            .and_then(|h| h.get(DEAD_LETTER_REASON_HEADER))
            .and_then(|v| match v {
                AmqpValue::LongString(s) => Some(s.clone()),
                _ => None,
            });
        // A job names its run and node (only small bodies are parsed).
        let job: Option<Value> = (body.len() <= 64 * 1024)
            .then(|| serde_json::from_slice(body).ok())
            .flatten();
        let field = |name: &str| {
            job.as_ref()
                .and_then(|j| j.get(name))
                .and_then(Value::as_str)
                .map(String::from)
        };
        DeadLetter {
            reason,
            body: String::from_utf8_lossy(&body[..body.len().min(DEAD_LETTER_BODY_SHOWN)])
                .into_owned(),
            bytes: body.len(),
            run_id: field("runId"),
            node_id: field("nodeId"),
            timestamp: *properties.timestamp(),
        }
    }
}

/// What [`peek_dead_letters`] saw.
#[derive(Debug, Clone, PartialEq)]
struct DeadLetterPeek {
    /// Messages in the queue.
    depth: u32,
    /// Messages looked at (from the head).
    scanned: usize,
    /// The last [`DEAD_LETTERS_SHOWN`] of those, newest first.
    latest: Vec<DeadLetter>,
    /// Whether the queue exists at all.
    exists: bool,
}

/// The depth of the dead-letter queue of `queue`, or why it is unknown.
fn dead_letter_depth(url: &str, queue: &str) -> std::result::Result<u32, String> {
    let name = amqp::dead_letter_queue(queue);
    match peek_dead_letters(url, &name, 0) {
        Ok(peek) if peek.exists => Ok(peek.depth),
        Ok(_) => Err(format!(
            "queue '{name}' does not exist yet (no worker has declared it)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Looks at the dead-letter queue without taking anything off it
/// ([`amqp::peek_queue`]): at most `scan` from its head, the last [`DEAD_LETTERS_SHOWN`] of
/// them kept (with `scan` 0, only its depth).
fn peek_dead_letters(
    url: &str,
    queue: &str,
    scan: usize,
) -> std::result::Result<DeadLetterPeek, AmqpError> {
    let mut conn = amqp::connect_named(url, Some("flowcraft dashboard"))?;
    let peek = (|| {
        let channel = conn.open_channel(None)?;
        let Some(depth) = amqp::queue_depth(&channel, queue)? else {
            return Ok(DeadLetterPeek {
                depth: 0,
                scanned: 0,
                latest: Vec::new(),
                exists: false,
            });
        };
        let mut latest = VecDeque::with_capacity(DEAD_LETTERS_SHOWN + 1);
        let scanned = amqp::peek_queue(&channel, queue, scan, |body, props| {
            latest.push_back(DeadLetter::of(body, props));
            if latest.len() > DEAD_LETTERS_SHOWN {
                latest.pop_front();
            }
        })?;
        let _ = channel.close();
        Ok(DeadLetterPeek {
            depth,
            scanned,
            latest: latest.into_iter().rev().collect(),
            exists: true,
        })
    })();
    let _ = conn.close();
    peek
}

// ---------------------------------------------------------------------------------------
// Node states.

/// A node's state on a run's graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// It has an output.
    Done,
    /// Its predecessors are done and the run is running: it is queued or executing.
    Running,
    /// It failed the run.
    Failed,
    /// The run awaits it (a wait, sleep, webhook or subflow node).
    Awaiting,
    /// None of the above.
    NotReached,
}

impl NodeState {
    /// Its CSS class and `data-state`: `done`, `running`, `failed`, `awaiting`, `not-reached`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Done => "done",
            NodeState::Running => "running",
            NodeState::Failed => "failed",
            NodeState::Awaiting => "awaiting",
            NodeState::NotReached => "not-reached",
        }
    }

    /// Its label for people.
    pub fn label(self) -> &'static str {
        match self {
            NodeState::NotReached => "not reached",
            other => other.as_str(),
        }
    }

    const ALL: [NodeState; 5] = [
        NodeState::Done,
        NodeState::Running,
        NodeState::Failed,
        NodeState::Awaiting,
        NodeState::NotReached,
    ];
}

/// A node of a run's graph: its state, and why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Its state.
    pub state: NodeState,
    /// The error it failed with (from its history, or the run's reason).
    pub error: Option<String>,
    /// Executions recorded for it (a batch's workers count for its gather node).
    pub executions: usize,
}

/// The node a run's failure reason names (`node '<id>' failed after …`), if any.
fn node_named_by(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix("node '")?;
    let end = rest.find("' failed after ")?;
    Some(&rest[..end])
}

/// A failure's message without the `node '<id>' failed after <n> attempt(s): ` before it.
fn failure_message(reason: &str) -> &str {
    match node_named_by(reason) {
        Some(_) => reason
            .split_once(" attempt(s): ")
            .map_or(reason, |(_, message)| message),
        None => reason,
    }
}

/// The blueprint node an execution's node id stands for: itself, or the gather node of a
/// batch worker (`<gatherId>#<index>`).
fn static_node(bp: &Blueprint, node_id: &str) -> Option<usize> {
    bp.node_index(node_id).or_else(|| {
        let (gather, index) = node_id.rsplit_once('#')?;
        index.parse::<u64>().ok()?;
        bp.node_index(gather)
    })
}

/// Each blueprint node's state in a run, in blueprint order:
///
/// - **awaiting**: listed in `_awaitingNodeIds`;
/// - **failed**: its history has a `failed` execution; else, in a failed run, the node the
///   failure reason names (`node '<id>' failed after …`), or else every node that is not
///   done but could run (a start node, or one whose predecessors are done as its join
///   needs): the failing frontier;
/// - **done**: `_outputs.<id>` exists;
/// - **running**: in a running run, not done but able to run (as above);
/// - **not reached**: the rest.
///
/// The failure's error comes from the history when recorded, else from the run's reason.
pub fn node_states(
    bp: &Blueprint,
    context: &Map<String, Value>,
    status: Option<RunStatus>,
    reason: Option<&str>,
    history: &[NodeExecution],
) -> Vec<NodeView> {
    let count = bp.node_count();
    let done: Vec<bool> = (0..count)
        .map(|i| context.contains_key(&output_key(&bp.node(i).id)))
        .collect();
    let mut executions = vec![0usize; count];
    let mut failed: Vec<Option<String>> = vec![None; count];
    for x in history {
        let Some(i) = static_node(bp, &x.node_id) else {
            continue;
        };
        executions[i] += 1;
        if x.outcome == "failed" {
            failed[i] = Some(x.error.clone().unwrap_or_default());
        }
    }
    let mut views: Vec<NodeView> = (0..count)
        .map(|i| {
            let state = if crate::runtime::scheduling::is_awaiting(context, &bp.node(i).id) {
                NodeState::Awaiting
            } else if failed[i].is_some() && !done[i] {
                NodeState::Failed
            } else if done[i] {
                NodeState::Done
            } else {
                NodeState::NotReached
            };
            NodeView {
                state,
                error: failed[i].clone().filter(|_| state == NodeState::Failed),
                executions: executions[i],
            }
        })
        .collect();
    let ready = |i: usize| -> bool {
        let preds = bp.forward_predecessors(i);
        if bp.start_nodes().contains(&i) || preds.is_empty() {
            return true;
        }
        match bp.join_strategy(i) {
            JoinStrategy::All => preds.iter().all(|&p| done[p]),
            JoinStrategy::Any => preds.iter().any(|&p| done[p]),
        }
    };
    let open = |views: &[NodeView], i: usize| views[i].state == NodeState::NotReached && ready(i);
    match status {
        Some(RunStatus::Failed) if !views.iter().any(|v| v.state == NodeState::Failed) => {
            let reason = reason.unwrap_or("the run failed");
            let named = node_named_by(reason)
                .and_then(|id| static_node(bp, id))
                .filter(|&i| !done[i]);
            let failing: Vec<usize> = match named {
                Some(i) => vec![i],
                None => (0..count).filter(|&i| open(&views, i)).collect(),
            };
            for i in failing {
                views[i].state = NodeState::Failed;
                views[i].error = Some(reason.to_string());
            }
        }
        Some(RunStatus::Running) => {
            for i in 0..count {
                if open(&views, i) {
                    views[i].state = NodeState::Running;
                }
            }
        }
        _ => {}
    }
    views
}

// ---------------------------------------------------------------------------------------
// Graph layout.

const NODE_W: f64 = 168.0;
const NODE_H: f64 = 48.0;
const GAP_X: f64 = 64.0;
const GAP_Y: f64 = 24.0;
const MARGIN: f64 = 16.0;
/// Room below the nodes for back edges.
const BACK_ROOM: f64 = 56.0;

/// Where each node goes: columns by layer, rows within a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Each node's layer: the longest path to it from a start node over forward edges.
    pub layer: Vec<usize>,
    /// Each node's top-left corner.
    pub position: Vec<(f64, f64)>,
    /// The drawing's width.
    pub width: f64,
    /// The drawing's height.
    pub height: f64,
}

/// Lays a blueprint out in layers (left to right), ordering each layer by where its nodes'
/// predecessors are (a barycentre pass), leaving room below for back edges.
pub fn layout(bp: &Blueprint) -> Layout {
    let count = bp.node_count();
    // Longest path over forward edges, in their topological order.
    let mut layer = vec![0usize; count];
    for &n in bp.forward_order() {
        layer[n] = bp
            .forward_predecessors(n)
            .iter()
            .map(|&p| layer[p] + 1)
            .max()
            .unwrap_or(0);
    }
    let layers = layer.iter().copied().max().map_or(0, |m| m + 1);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (i, &l) in layer.iter().enumerate() {
        rows[l].push(i);
    }
    // Barycentre: order a layer by the mean row of its nodes' forward predecessors.
    let mut row_of = vec![0f64; count];
    for row in &rows {
        for (r, &i) in row.iter().enumerate() {
            row_of[i] = r as f64;
        }
    }
    for row in rows.iter_mut().skip(1) {
        let key = |i: usize| -> f64 {
            let preds = bp.forward_predecessors(i);
            if preds.is_empty() {
                row_of[i]
            } else {
                preds.iter().map(|&p| row_of[p]).sum::<f64>() / preds.len() as f64
            }
        };
        let mut keyed: Vec<(f64, usize)> = row.iter().map(|&i| (key(i), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *row = keyed.into_iter().map(|(_, i)| i).collect();
        for (r, &i) in row.iter().enumerate() {
            row_of[i] = r as f64;
        }
    }
    let tallest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let column_height = |n: usize| n as f64 * (NODE_H + GAP_Y) - GAP_Y;
    let mut position = vec![(0.0, 0.0); count];
    for (l, row) in rows.iter().enumerate() {
        let offset = (column_height(tallest) - column_height(row.len())) / 2.0;
        for (r, &i) in row.iter().enumerate() {
            position[i] = (
                MARGIN + l as f64 * (NODE_W + GAP_X),
                MARGIN + offset + r as f64 * (NODE_H + GAP_Y),
            );
        }
    }
    // (A self-loop is a back edge too.)
    let back = (0..bp.def().edges.len()).any(|e| bp.is_back_edge(e));
    Layout {
        layer,
        position,
        width: 2.0 * MARGIN + (layers as f64 * (NODE_W + GAP_X) - GAP_X).max(NODE_W),
        height: 2.0 * MARGIN
            + column_height(tallest).max(NODE_H)
            + if back { BACK_ROOM } else { 0.0 },
    }
}

/// The blueprint drawn as SVG, each node a `<g class="node <state>">` with `data-node-id`,
/// `data-state` (and `data-error` when it failed), its tooltip saying the same.
pub fn render_graph(bp: &Blueprint, views: &[NodeView]) -> String {
    let layout = layout(bp);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" role="img" aria-label="graph of blueprint {id}">"#,
        w = layout.width,
        h = layout.height,
        id = escape(bp.id()),
    );
    out.push_str(
        r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#607d8b"/></marker></defs>"##,
    );
    let bottom = layout.height - MARGIN;
    for e in 0..bp.def().edges.len() {
        let (s, t) = bp.edge_ends(e);
        let def = bp.edge(e);
        let (sx, sy) = layout.position[s];
        let (tx, ty) = layout.position[t];
        let back = bp.is_back_edge(e);
        let path = if back {
            let (x1, y1) = (sx + NODE_W * 0.6, sy + NODE_H);
            let (x2, y2) = (tx + NODE_W * 0.4, ty + NODE_H);
            let low = (y1.max(y2) + BACK_ROOM - 8.0).min(bottom);
            format!("M{x1:.1},{y1:.1} C{x1:.1},{low:.1} {x2:.1},{low:.1} {x2:.1},{y2:.1}")
        } else {
            let (x1, y1) = (sx + NODE_W, sy + NODE_H / 2.0);
            let (x2, y2) = (tx, ty + NODE_H / 2.0);
            let dx = ((x2 - x1) / 2.0).max(GAP_X / 2.0);
            format!(
                "M{x1:.1},{y1:.1} C{:.1},{y1:.1} {:.1},{y2:.1} {x2:.1},{y2:.1}",
                x1 + dx,
                x2 - dx
            )
        };
        let mut tip = format!("{} → {}", def.source, def.target);
        if let Some(action) = &def.action {
            let _ = write!(tip, " on action {action}");
        }
        if let Some(condition) = &def.condition {
            let _ = write!(tip, " if {condition}");
        }
        let _ = write!(
            out,
            r#"<g class="edge{}" data-source="{}" data-target="{}"><title>{}</title><path d="{path}" marker-end="url(#arrow)"/>"#,
            if back { " back" } else { "" },
            escape(&def.source),
            escape(&def.target),
            escape(&tip),
        );
        let label = def
            .action
            .clone()
            .or_else(|| def.condition.as_ref().map(|_| "if …".to_string()));
        if let Some(label) = label {
            let (lx, ly) = if back {
                (
                    (sx + tx + NODE_W) / 2.0,
                    (sy.max(ty) + NODE_H + BACK_ROOM - 12.0).min(bottom),
                )
            } else {
                ((sx + NODE_W + tx) / 2.0, (sy + ty + NODE_H) / 2.0 - 4.0)
            };
            let _ = write!(
                out,
                r#"<text class="edge-label" x="{lx:.1}" y="{ly:.1}" text-anchor="middle">{}</text>"#,
                escape(&cut(&label, 18))
            );
        }
        out.push_str("</g>");
    }
    for (i, view) in views.iter().enumerate().take(bp.node_count()) {
        let node = bp.node(i);
        let (x, y) = layout.position[i];
        let state = view.state;
        let mut tip = format!("{} ({}): {}", node.id, node.uses, state.label());
        if let Some(error) = &view.error {
            let _ = write!(tip, " — {error}");
        }
        if view.executions > 0 {
            let _ = write!(tip, " · {} execution(s)", view.executions);
        }
        let _ = write!(
            out,
            r##"<g class="node {state}" data-node-id="{id}" data-state="{state}"{error} transform="translate({x:.1},{y:.1})"><title>{tip}</title><a href="#node-{i}"><rect width="{NODE_W}" height="{NODE_H}" rx="7"/><text class="id" x="10" y="20">{label}</text><text class="sub" x="10" y="38">{uses} · {state_label}</text></a>{error_line}</g>"##,
            state = state.as_str(),
            id = escape(&node.id),
            error = view
                .error
                .as_ref()
                .map(|e| format!(r#" data-error="{}""#, escape(e)))
                .unwrap_or_default(),
            tip = escape(&tip),
            label = escape(&cut(&node.id, 20)),
            uses = escape(&cut(&node.uses, 14)),
            state_label = state.label(),
            error_line = view
                .error
                .as_ref()
                .map(|e| format!(
                    r#"<text class="node-error" x="2" y="{:.0}">{}</text>"#,
                    NODE_H + 15.0,
                    escape(&cut(failure_message(e), 30))
                ))
                .unwrap_or_default(),
        );
    }
    out.push_str("</svg>");
    out
}

// ---------------------------------------------------------------------------------------
// Pages.

/// What the runs page shows.
struct RunsView {
    counts: Vec<(RunStatus, i64)>,
    status: Option<RunStatus>,
    blueprint: Option<String>,
    runs: Vec<RunSummary>,
    blueprints: Vec<String>,
    throughput: std::result::Result<Vec<(u32, i64)>, String>,
    dead_letters: std::result::Result<u32, String>,
    queue: String,
}

/// What a run's page shows.
struct RunView<'a> {
    run_id: String,
    status: Option<StatusRow>,
    context: Map<String, Value>,
    history: Vec<NodeExecution>,
    blueprint_id: Option<String>,
    blueprint: Option<&'a Blueprint>,
}

fn runs_href(base: &str, status: Option<RunStatus>, blueprint: Option<&str>) -> String {
    let status = status.map_or("all", RunStatus::as_str);
    match blueprint {
        None if status == "all" => format!("{base}/"),
        None => format!("{base}/runs/{status}"),
        Some(bp) => format!("{base}/runs/{status}/{}", encode_segment(bp)),
    }
}

fn run_href(base: &str, run: &str) -> String {
    format!("{base}/run/{}", encode_segment(run))
}

fn render_runs(base: &str, view: &RunsView) -> String {
    let mut body = String::new();
    let total: i64 = view.counts.iter().map(|(_, n)| n).sum();
    body.push_str(r#"<section class="statuses"><h2>Runs by status</h2><div class="chips">"#);
    let bp = view.blueprint.as_deref();
    // One chip for all runs, then one per status.
    for status in std::iter::once(None).chain(RunStatus::ALL.map(Some)) {
        let n = match status {
            None => total,
            Some(status) => view
                .counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n),
        };
        let _ = write!(
            body,
            r#"<a class="chip {s}{}" href="{}" data-status="{s}" data-count="{n}">{s} <b>{n}</b></a>"#,
            if view.status == status {
                " current"
            } else {
                ""
            },
            escape(&runs_href(base, status, bp)),
            s = status.map_or("all", RunStatus::as_str),
        );
    }
    body.push_str("</div>");
    if !view.blueprints.is_empty() || bp.is_some() {
        body.push_str(r#"<p class="filters">Blueprint: "#);
        let _ = write!(
            body,
            r#"<a class="{}" href="{}">any</a>"#,
            if bp.is_none() { "current" } else { "" },
            escape(&runs_href(base, view.status, None))
        );
        let mut ids: Vec<&str> = view.blueprints.iter().map(String::as_str).collect();
        if let Some(bp) = bp {
            if !ids.contains(&bp) {
                ids.push(bp);
            }
        }
        for id in ids {
            let _ = write!(
                body,
                r#" · <a class="{}" href="{}">{}</a>"#,
                if bp == Some(id) { "current" } else { "" },
                escape(&runs_href(base, view.status, Some(id))),
                escape(id)
            );
        }
        body.push_str("</p>");
    }
    body.push_str(
        "<p class=\"note\">Counts are over all runs; the filters apply to the list.</p></section>",
    );

    body.push_str(r#"<div class="columns"><section class="runs">"#);
    let _ = write!(
        body,
        "<h2>{} runs{}</h2>",
        view.status.map_or("All", RunStatus::as_str),
        view.blueprint
            .as_deref()
            .map(|b| format!(" of {}", escape(b)))
            .unwrap_or_default()
    );
    if view.runs.is_empty() {
        body.push_str(r#"<p class="empty">No runs.</p>"#);
    } else {
        body.push_str(
            "<table class=\"runs\"><thead><tr><th>Run</th><th>Status</th><th>Blueprint</th><th>Started</th><th>Updated</th></tr></thead><tbody>",
        );
        for run in &view.runs {
            let _ = write!(
                body,
                r#"<tr data-run-id="{id}" data-status="{s}"><td><a href="{href}">{label}</a></td><td><span class="badge {s}">{s}</span></td><td>{bp}</td><td>{started}</td><td>{updated}</td></tr>"#,
                id = escape(&run.run_id),
                s = run.status.as_str(),
                href = escape(&run_href(base, &run.run_id)),
                label = escape(&cut(&run.run_id, 48)),
                bp = escape(run.blueprint_id.as_deref().unwrap_or("—")),
                started = escape(&short_time(run.created_at.as_deref())),
                updated = escape(&short_time(run.updated_at.as_deref())),
            );
        }
        body.push_str("</tbody></table>");
        if view.runs.len() as i64 >= RUNS_SHOWN {
            let _ = write!(
                body,
                r#"<p class="note">The newest {RUNS_SHOWN} are shown.</p>"#
            );
        }
    }
    body.push_str(r#"</section><aside>"#);
    body.push_str("<section class=\"throughput\"><h2>Throughput</h2>");
    match &view.throughput {
        Ok(per_minute) => body.push_str(&render_throughput(per_minute, THROUGHPUT_MINUTES)),
        Err(e) => {
            let _ = write!(body, r#"<p class="error">{}</p>"#, escape(e));
        }
    }
    body.push_str("</section><section class=\"dlq\"><h2>Dead letters</h2>");
    let dlq = escape(&amqp::dead_letter_queue(&view.queue));
    match &view.dead_letters {
        Ok(depth) => {
            let _ = write!(
                body,
                r#"<p><a class="depth" href="{base}/dead-letters" data-depth="{depth}"><b>{depth}</b> message(s)</a> in <code>{dlq}</code></p>"#,
                base = escape(base),
            );
        }
        Err(e) => {
            let _ = write!(
                body,
                r#"<p>Queue <code>{dlq}</code>: <span class="error">{}</span></p>"#,
                escape(e)
            );
        }
    }
    body.push_str("</section></aside></div>");
    layout_page(base, "Runs", true, &body)
}

/// Node executions per minute as an SVG bar chart, oldest left (`(minutes ago, count)`).
pub fn render_throughput(per_minute: &[(u32, i64)], minutes: u32) -> String {
    let minutes = minutes.max(1) as usize;
    let mut bars = vec![0i64; minutes];
    for &(ago, n) in per_minute {
        let ago = (ago as usize).min(minutes - 1);
        bars[minutes - 1 - ago] += n.max(0);
    }
    let total: i64 = bars.iter().sum();
    let top = bars.iter().copied().max().unwrap_or(0).max(1);
    let (w, h, bar_w) = (minutes as f64 * 10.0, 90.0, 8.0);
    let mut out = format!(
        r#"<p><b class="total" data-total="{total}">{total}</b> node executions in the last {minutes} minutes (peak {} a minute)</p><svg class="throughput" xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{:.0}" viewBox="0 0 {w:.0} {:.0}" role="img" aria-label="node executions per minute">"#,
        bars.iter().max().copied().unwrap_or(0),
        h + 16.0,
        h + 16.0,
    );
    for (i, &n) in bars.iter().enumerate() {
        let bh = if n == 0 {
            1.0
        } else {
            (n as f64 / top as f64 * h).max(2.0)
        };
        let ago = minutes - 1 - i;
        let _ = write!(
            out,
            r#"<rect class="bar{}" x="{:.1}" y="{:.1}" width="{bar_w}" height="{bh:.1}"><title>{n} execution(s), {ago} min ago</title></rect>"#,
            if n == 0 { " zero" } else { "" },
            i as f64 * 10.0 + 1.0,
            h - bh,
        );
    }
    let _ = write!(
        out,
        r#"<text x="0" y="{y:.0}" class="axis">−{minutes} min</text><text x="{w:.0}" y="{y:.0}" class="axis" text-anchor="end">now</text></svg>"#,
        y = h + 13.0
    );
    out
}

fn render_run(base: &str, view: &RunView) -> String {
    let mut body = String::new();
    let status = view.status.as_ref().map(|s| s.status);
    let status_name = status.map_or("unknown", RunStatus::as_str);
    let reason = view.status.as_ref().and_then(StatusRow::reason);
    let _ = write!(
        body,
        r#"<section class="run" data-run-id="{id}" data-status="{s}"><h2>Run <code>{id}</code> <span class="badge {s}">{s}</span></h2><dl>"#,
        id = escape(&view.run_id),
        s = status_name,
    );
    if let Some(bp) = &view.blueprint_id {
        let _ = write!(
            body,
            r#"<dt>Blueprint</dt><dd><a href="{}">{}</a></dd>"#,
            escape(&runs_href(base, None, Some(bp))),
            escape(bp)
        );
    }
    if let Some(updated) = view.status.as_ref().and_then(|s| s.updated_at.as_deref()) {
        let _ = write!(
            body,
            "<dt>Updated</dt><dd>{}</dd>",
            escape(&short_time(Some(updated)))
        );
    }
    if let Some(reason) = reason {
        let _ = write!(
            body,
            r#"<dt>Reason</dt><dd class="reason">{}</dd>"#,
            escape(reason)
        );
    }
    body.push_str("</dl></section>");

    body.push_str(r#"<section class="graph"><h2>Graph</h2>"#);
    match view.blueprint {
        Some(bp) => {
            let stamped = view.context.get(BLUEPRINT_VERSION).and_then(Value::as_str);
            if let (Some(stamped), Some(loaded)) = (stamped, bp.version()) {
                if stamped != loaded {
                    let _ = write!(
                        body,
                        r#"<p class="warning">The run was started with version {} of the blueprint; version {} is drawn.</p>"#,
                        escape(stamped),
                        escape(&loaded)
                    );
                }
            }
            let views = node_states(bp, &view.context, status, reason, &view.history);
            body.push_str(r#"<div class="legend">"#);
            for state in NodeState::ALL {
                let n = views.iter().filter(|v| v.state == state).count();
                let _ = write!(
                    body,
                    r#"<span class="key {s}">{} ({n})</span>"#,
                    state.label(),
                    s = state.as_str()
                );
            }
            body.push_str(r#"</div><div class="canvas">"#);
            body.push_str(&render_graph(bp, &views));
            body.push_str("</div>");
            body.push_str(&render_nodes_table(
                bp,
                &views,
                &view.context,
                !view.history.is_empty(),
            ));
        }
        None => {
            let _ = write!(
                body,
                r#"<p class="warning">Blueprint {} is not loaded here, so the graph cannot be drawn (start the dashboard with the directory that holds it).</p>"#,
                view.blueprint_id
                    .as_deref()
                    .map(|b| format!("<code>{}</code>", escape(b)))
                    .unwrap_or_else(|| "(none named in the context)".to_string())
            );
        }
    }
    body.push_str("</section>");

    body.push_str(r#"<section class="timeline"><h2>Timeline</h2>"#);
    body.push_str(&render_timeline(&view.history));
    body.push_str("</section>");
    let refresh = !status.is_some_and(RunStatus::is_finished);
    layout_page(base, &format!("Run {}", view.run_id), refresh, &body)
}

/// The nodes as a table; `recorded`: whether the run has any history (else executions are
/// unknown, not zero).
fn render_nodes_table(
    bp: &Blueprint,
    views: &[NodeView],
    context: &Map<String, Value>,
    recorded: bool,
) -> String {
    let mut out = String::from(
        "<table class=\"nodes\"><thead><tr><th>Node</th><th>Uses</th><th>State</th><th>Executions</th><th>Error / waits for</th></tr></thead><tbody>",
    );
    for (i, view) in views.iter().enumerate().take(bp.node_count()) {
        let node = bp.node(i);
        let detail = match (&view.error, view.state) {
            (Some(error), _) => format!(r#"<span class="error">{}</span>"#, escape(error)),
            (None, NodeState::Awaiting) => context
                .get(AWAITING_DETAILS)
                .and_then(|d| d.get(&node.id))
                .map(|d| format!("<code>{}</code>", escape(&cut(&d.to_string(), 300))))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let _ = write!(
            out,
            r#"<tr id="node-{i}" data-node-id="{id}" data-state="{s}"><td><code>{id}</code></td><td>{uses}</td><td><span class="badge {s}">{label}</span></td><td>{n}</td><td>{detail}</td></tr>"#,
            id = escape(&node.id),
            uses = escape(&node.uses),
            s = view.state.as_str(),
            label = view.state.label(),
            n = if recorded {
                view.executions.to_string()
            } else {
                "—".to_string()
            },
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// A run's node executions as an SVG timeline (a bar per execution, from its start, as long
/// as it took) and a table.
pub fn render_timeline(history: &[NodeExecution]) -> String {
    if history.is_empty() {
        return r#"<p class="empty">No node executions are recorded for this run.</p>"#.into();
    }
    let shown = &history[..history.len().min(TIMELINE_SHOWN)];
    let t0 = shown
        .iter()
        .map(|x| x.started_ms)
        .fold(f64::INFINITY, f64::min);
    let end = shown
        .iter()
        .map(|x| x.started_ms - t0 + x.duration_ms.max(0.0))
        .fold(0.0, f64::max)
        .max(1.0);
    let (label_w, plot_w, row_h) = (220.0, 640.0, 18.0);
    let height = shown.len() as f64 * row_h + 24.0;
    let mut out = format!(
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{height:.0}" viewBox="0 0 {w:.0} {height:.0}" role="img" aria-label="timeline">"#,
        w = label_w + plot_w + 10.0,
    );
    for (row, x) in shown.iter().enumerate() {
        let y = row as f64 * row_h;
        let from = (x.started_ms - t0) / end * plot_w;
        let width = (x.duration_ms.max(0.0) / end * plot_w).max(2.0);
        let mut tip = format!(
            "{} · iteration {} · attempt {} · {} · {:.1} ms · {}",
            x.node_id, x.iteration, x.attempt, x.outcome, x.duration_ms, x.worker
        );
        if let Some(error) = &x.error {
            let _ = write!(tip, " · {error}");
        }
        let _ = write!(
            out,
            r#"<g class="exec {o}" data-node-id="{id}" data-outcome="{o}"><title>{tip}</title><text x="0" y="{ty:.1}">{label}</text><rect x="{bx:.1}" y="{y:.1}" width="{width:.1}" height="{bh:.1}" rx="2"/></g>"#,
            o = css_word(&x.outcome),
            id = escape(&x.node_id),
            tip = escape(&tip),
            ty = y + 13.0,
            label = escape(&cut(
                &if x.attempt > 1 {
                    format!("{} (attempt {})", x.node_id, x.attempt)
                } else {
                    x.node_id.clone()
                },
                30
            )),
            bx = label_w + from,
            bh = row_h - 4.0,
        );
    }
    let axis = shown.len() as f64 * row_h + 14.0;
    let _ = write!(
        out,
        r#"<text class="axis" x="{label_w}" y="{axis:.0}">0 ms</text><text class="axis" x="{:.0}" y="{axis:.0}" text-anchor="end">{end:.0} ms</text></svg>"#,
        label_w + plot_w
    );
    if history.len() > shown.len() {
        let _ = write!(
            out,
            r#"<p class="note">The first {} of {} executions are drawn.</p>"#,
            shown.len(),
            history.len()
        );
    }
    out.push_str("<table class=\"executions\"><thead><tr><th>Node</th><th>Iteration</th><th>Attempt</th><th>Outcome</th><th>Started</th><th>ms</th><th>Worker</th><th>Error</th></tr></thead><tbody>");
    for x in shown {
        let _ = write!(
            out,
            r#"<tr data-node-id="{id}" data-outcome="{o}"><td><code>{id}</code></td><td>{}</td><td>{}</td><td><span class="badge {o}">{o}</span></td><td>{}</td><td>{:.1}</td><td>{}</td><td class="error">{}</td></tr>"#,
            x.iteration,
            x.attempt,
            escape(&short_time(Some(&x.started_at))),
            x.duration_ms,
            escape(&x.worker),
            escape(x.error.as_deref().unwrap_or("")),
            id = escape(&x.node_id),
            o = css_word(&x.outcome),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn render_dead_letters(
    base: &str,
    queue: &str,
    peek: &std::result::Result<DeadLetterPeek, String>,
) -> String {
    let mut body = format!(
        r#"<section class="dead-letters"><h2>Dead letters in <code>{}</code></h2>"#,
        escape(queue)
    );
    match peek {
        Err(e) => {
            let _ = write!(
                body,
                r#"<p class="error">RabbitMQ could not be read: {}</p>"#,
                escape(e)
            );
        }
        Ok(peek) if !peek.exists => {
            body.push_str(r#"<p class="empty" data-depth="0">The queue does not exist yet: no worker has declared it.</p>"#);
        }
        Ok(peek) => {
            let _ = write!(
                body,
                r#"<p><b class="depth" data-depth="{d}">{d}</b> message(s) in the queue.</p>"#,
                d = peek.depth
            );
            if peek.latest.is_empty() {
                body.push_str(r#"<p class="empty">No messages.</p>"#);
            } else {
                let which = if (peek.depth as usize) <= peek.scanned {
                    format!("The latest {} (newest first)", peek.latest.len())
                } else {
                    format!(
                        "Messages {}–{} from the head (newest of those first): a queue is read from its head, and the dashboard looks at the first {} only",
                        peek.scanned + 1 - peek.latest.len(),
                        peek.scanned,
                        DEAD_LETTERS_SCANNED
                    )
                };
                let _ = write!(
                    body,
                    r#"<p class="note">{which}. Reading them puts them back where they were (marked redelivered); nothing is removed.</p><ol class="messages">"#
                );
                for m in &peek.latest {
                    body.push_str(r#"<li class="message">"#);
                    if let Some(reason) = &m.reason {
                        let _ = write!(body, r#"<p class="reason">{}</p>"#, escape(reason));
                    }
                    let mut meta = Vec::new();
                    if let Some(run) = &m.run_id {
                        meta.push(format!(
                            r#"run <a href="{}"><code>{}</code></a>"#,
                            escape(&run_href(base, run)),
                            escape(run)
                        ));
                    }
                    if let Some(node) = &m.node_id {
                        meta.push(format!("node <code>{}</code>", escape(node)));
                    }
                    if let Some(ts) = m.timestamp {
                        meta.push(format!("at {}", escape(&format_epoch(ts))));
                    }
                    meta.push(format!("{} bytes", m.bytes));
                    let _ = write!(body, r#"<p class="meta">{}</p>"#, meta.join(" · "));
                    let _ = write!(
                        body,
                        r#"<pre class="body">{}{}</pre></li>"#,
                        escape(&m.body),
                        if m.bytes > DEAD_LETTER_BODY_SHOWN {
                            "\n…"
                        } else {
                            ""
                        }
                    );
                }
                body.push_str("</ol>");
            }
        }
    }
    body.push_str("</section>");
    layout_page(base, "Dead letters", false, &body)
}

fn message_page(base: &str, title: &str, text: &str) -> String {
    layout_page(
        base,
        title,
        false,
        &format!(
            r#"<section class="message"><h2>{}</h2><p>{}</p></section>"#,
            escape(title),
            escape(text)
        ),
    )
}

const STYLE: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;background:#f5f7fa}
header{display:flex;gap:24px;align-items:center;padding:10px 24px;background:#1f2933;color:#fff}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700;font-size:16px}
header nav a{margin-right:16px;opacity:.85}header nav a:hover{opacity:1;text-decoration:underline}
main{padding:16px 24px}h2{font-size:16px;margin:8px 0 10px}
section{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:12px 16px;margin-bottom:16px}
a{color:#1565c0}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.chips{display:flex;flex-wrap:wrap;gap:8px}
.chip{padding:6px 12px;border-radius:16px;border:1px solid #cbd2d9;text-decoration:none;color:#1f2933;background:#fff}
.chip.current{outline:2px solid #1f2933}
.chip.running,.badge.running{background:#e3f2fd;border-color:#1565c0}
.chip.awaiting,.badge.awaiting{background:#fff3e0;border-color:#ef6c00}
.chip.completed,.badge.completed,.badge.done{background:#e8f5e9;border-color:#2e7d32}
.chip.failed,.badge.failed{background:#ffebee;border-color:#c62828}
.chip.cancelled,.badge.cancelled,.badge.not-reached{background:#f0f0f0;border-color:#9e9e9e}
.badge.retried{background:#fff8e1;border-color:#f9a825}
.badge{display:inline-block;white-space:nowrap;padding:1px 8px;border-radius:10px;border:1px solid #cbd2d9;font-size:12px}
.filters a.current,.filters a.current:visited{font-weight:700;color:#1f2933;text-decoration:none}
.note,.empty{color:#616e7c;font-size:12px}.error{color:#c62828}.warning{color:#8d4b00}
.columns{display:grid;grid-template-columns:minmax(0,1fr) 340px;gap:16px;align-items:start}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f2;vertical-align:top}
th{font-size:12px;color:#616e7c;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}dt{color:#616e7c}dd{margin:0}
.reason{color:#c62828;white-space:pre-wrap;word-break:break-word}
.canvas{overflow:auto;border:1px solid #eef0f2;border-radius:6px;background:#fbfcfd;margin:8px 0 12px}
.legend{display:flex;gap:12px;flex-wrap:wrap}.legend .key{font-size:12px;padding:1px 8px;border-radius:10px;border:2px solid}
svg text{font:12px system-ui,sans-serif;fill:#1f2933}svg .sub{font-size:11px;fill:#52606d}svg .axis{font-size:10px;fill:#616e7c}
.edge path{fill:none;stroke:#607d8b;stroke-width:1.4}.edge.back path{stroke-dasharray:5 4}
.edge-label{font-size:10px;fill:#52606d}
.node rect{stroke-width:2}
.node.done rect{fill:#e8f5e9;stroke:#2e7d32}.key.done{border-color:#2e7d32;background:#e8f5e9}
.node.running rect{fill:#e3f2fd;stroke:#1565c0}.key.running{border-color:#1565c0;background:#e3f2fd}
.node.failed rect{fill:#ffcdd2;stroke:#c62828;stroke-width:3}.key.failed{border-color:#c62828;background:#ffebee}
.node.awaiting rect{fill:#fff3e0;stroke:#ef6c00}.key.awaiting{border-color:#ef6c00;background:#fff3e0}
.node.not-reached rect{fill:#fafafa;stroke:#9e9e9e;stroke-dasharray:4 3}.key.not-reached{border-color:#9e9e9e;background:#fafafa}
.node.failed .id{font-weight:700;fill:#b71c1c}svg .node-error{font-size:11px;fill:#c62828}
.exec rect{fill:#90a4ae}.exec.completed rect{fill:#66bb6a}.exec.failed rect{fill:#e53935}.exec.retried rect{fill:#ffb300}.exec.awaiting rect{fill:#fb8c00}
.throughput .bar{fill:#42a5f5}.throughput .bar.zero{fill:#cfd8dc}
.messages{padding-left:20px}.message{margin-bottom:12px}
pre.body{background:#f5f7fa;border:1px solid #e4e7eb;border-radius:4px;padding:8px;white-space:pre-wrap;word-break:break-all;max-height:240px;overflow:auto;margin:4px 0}
footer{padding:8px 24px;color:#9aa5b1;font-size:12px}
"#;

/// The page around a body: head, style, navigation, footer.
/// A page; one that `refreshes` reloads itself every [`REFRESH_SECS`].
fn layout_page(base: &str, title: &str, refreshes: bool, body: &str) -> String {
    let refresh = if refreshes {
        format!(r#"<meta http-equiv="refresh" content="{REFRESH_SECS}">"#)
    } else {
        String::new()
    };
    format!(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer"><meta name="viewport" content="width=device-width, initial-scale=1">{refresh}<title>{title} · flowcraft dashboard</title><style>{STYLE}</style></head><body><header><a class="brand" href="{base}/">flowcraft dashboard</a><nav><a href="{base}/">Runs</a><a href="{base}/dead-letters">Dead letters</a></nav></header><main>{body}</main><footer>Read-only.{note}</footer></body></html>"#,
        title = escape(title),
        base = escape(base),
        note = if refreshes {
            format!(" This page reloads every {REFRESH_SECS} s.")
        } else {
            String::new()
        },
    )
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Escapes text for HTML and SVG, in text and in quoted attributes alike.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one path segment (everything but unreserved characters).
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A word safe in a class name (outcomes come from rows).
fn css_word(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(24)
        .collect()
}

/// At most `max` characters, with an ellipsis when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `2024-05-01T12:34:56.789Z` as `2024-05-01 12:34:56`; `—` when absent.
fn short_time(time: Option<&str>) -> String {
    match time {
        None => "—".into(),
        Some(t) => {
            let t = t.replacen('T', " ", 1);
            match t.find('.') {
                Some(dot) => t[..dot].to_string(),
                None => t.trim_end_matches('Z').to_string(),
            }
        }
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn format_epoch(secs: u64) -> String {
    let rfc3339 = crate::engine::nodes::rfc3339_from_ms(secs.saturating_mul(1000));
    format!(
        "{} UTC",
        rfc3339.get(..19).unwrap_or(&rfc3339).replace('T', " ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOSTILE: &str = "<script>alert('x')</script>";

    fn bp(json: &str) -> Blueprint {
        Blueprint::from_json(json).unwrap()
    }

    fn context(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn execution(node: &str, outcome: &str, error: Option<&str>) -> NodeExecution {
        NodeExecution {
            node_id: node.into(),
            iteration: 0,
            attempt: 1,
            outcome: outcome.into(),
            error: error.map(String::from),
            started_at: "2024-05-01T12:00:00.000Z".into(),
            started_ms: 1_714_564_800_000.0,
            duration_ms: 12.5,
            worker: "host:1".into(),
        }
    }

    /// a → b → d, a → c → d.
    fn diamond() -> Blueprint {
        bp(
            r#"{"id":"diamond","nodes":[{"id":"a","uses":"inc"},{"id":"b","uses":"inc"},
            {"id":"c","uses":"inc"},{"id":"d","uses":"inc"}],
            "edges":[{"source":"a","target":"b"},{"source":"a","target":"c"},
                     {"source":"b","target":"d"},{"source":"c","target":"d"}]}"#,
        )
    }

    fn states(views: &[NodeView]) -> Vec<&'static str> {
        views.iter().map(|v| v.state.as_str()).collect()
    }

    /// Fails if `<script` appears anywhere but where the page itself could put it (nowhere).
    fn assert_no_markup_from_data(page: &str) {
        assert!(!page.contains("<script"), "unescaped markup in: {page}");
        assert!(
            page.contains("&lt;script&gt;"),
            "the value is not shown escaped: {page}"
        );
    }

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn segments_round_trip_through_percent_encoding() {
        for id in ["run-1", "a/b c?d#e%f", HOSTILE, "ünï"] {
            let encoded = encode_segment(id);
            assert!(encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(percent_decode(&encoded), id);
        }
    }

    #[test]
    fn the_token_is_a_bearer_header_or_a_path_prefix() {
        let granted = |base: &str, rest: &str| Access::Granted {
            base: base.into(),
            rest: rest.into(),
        };
        assert_eq!(authorize(None, "/run/x", None), granted("", "/run/x"));
        assert_eq!(authorize(Some("s3"), "/run/x", None), Access::Denied);
        assert_eq!(
            authorize(Some("s3"), "/run/x", Some("Bearer s4")),
            Access::Denied
        );
        assert_eq!(
            authorize(Some("s3"), "/run/x", Some("Basic s3")),
            Access::Denied
        );
        assert_eq!(
            authorize(Some("s3"), "/run/x", Some("bearer  s3 ")),
            granted("", "/run/x")
        );
        assert_eq!(
            authorize(Some("s3"), "/t/s3/run/x", None),
            granted("/t/s3", "/run/x")
        );
        assert_eq!(authorize(Some("s3"), "/t/s3", None), granted("/t/s3", "/"));
        assert_eq!(authorize(Some("s3"), "/t/s4/run/x", None), Access::Denied);
        assert_eq!(
            authorize(Some("a b/c"), "/t/a%20b%2Fc/", None),
            granted("/t/a%20b%2Fc", "/")
        );
        // A right header does not open a wrong prefix.
        assert_eq!(
            authorize(Some("s3"), "/t/s4/", Some("Bearer s3")),
            Access::Denied
        );
    }

    #[test]
    fn a_failed_run_marks_the_node_its_reason_names() {
        let bp = diamond();
        let ctx = context(json!({"_outputs.a": 1, "_outputs.b": 2}));
        let reason = "node 'c' failed after 3 attempt(s): boom";
        let views = node_states(&bp, &ctx, Some(RunStatus::Failed), Some(reason), &[]);
        assert_eq!(states(&views), ["done", "done", "failed", "not-reached"]);
        assert_eq!(views[2].error.as_deref(), Some(reason));
        assert_eq!(views[0].error, None);
    }

    #[test]
    fn a_failed_run_without_a_named_node_marks_its_frontier() {
        let bp = diamond();
        let ctx = context(json!({"_outputs.a": 1}));
        let views = node_states(
            &bp,
            &ctx,
            Some(RunStatus::Failed),
            Some("the run could not go on"),
            &[],
        );
        assert_eq!(states(&views), ["done", "failed", "failed", "not-reached"]);
        // Nothing done: the start node failed.
        let views = node_states(&bp, &Map::new(), Some(RunStatus::Failed), None, &[]);
        assert_eq!(
            states(&views),
            ["failed", "not-reached", "not-reached", "not-reached"]
        );
        assert_eq!(views[0].error.as_deref(), Some("the run failed"));
    }

    #[test]
    fn the_history_names_the_failed_node_and_its_error() {
        let bp = diamond();
        let ctx = context(json!({"_outputs.a": 1, "_outputs.c": 1}));
        let history = [
            execution("a", "completed", None),
            execution("b", "retried", Some("flaky")),
            execution("b", "failed", Some("down for good")),
            execution("c", "completed", None),
        ];
        let views = node_states(
            &bp,
            &ctx,
            Some(RunStatus::Failed),
            Some("node 'b' failed after 2 attempt(s): down for good"),
            &history,
        );
        assert_eq!(states(&views), ["done", "failed", "done", "not-reached"]);
        assert_eq!(views[1].error.as_deref(), Some("down for good"));
        assert_eq!(views[1].executions, 2);
    }

    #[test]
    fn a_batch_workers_failure_shows_on_its_gather_node() {
        let bp = bp(r#"{"id":"batch","nodes":[{"id":"s","uses":"batch-scatter",
              "params":{"workerUsesKey":"w","gatherNodeId":"g"}},
            {"id":"g","uses":"batch-gather","params":{"outputKey":"out"}}],
            "edges":[{"source":"s","target":"g"}]}"#);
        let ctx = context(json!({"_outputs.s": [1, 2]}));
        let views = node_states(
            &bp,
            &ctx,
            Some(RunStatus::Failed),
            Some("node 'g#1' failed after 1 attempt(s): bad item"),
            &[],
        );
        assert_eq!(states(&views), ["done", "failed"]);
        let history = [
            execution("g#0", "completed", None),
            execution("g#1", "failed", Some("bad item")),
        ];
        let views = node_states(&bp, &ctx, Some(RunStatus::Failed), None, &history);
        assert_eq!(states(&views), ["done", "failed"]);
        assert_eq!(views[1].executions, 2);
        assert_eq!(views[1].error.as_deref(), Some("bad item"));
    }

    #[test]
    fn running_and_awaiting_nodes() {
        let bp = diamond();
        let ctx = context(json!({"_outputs.a": 1, "_outputs.b": 2}));
        let views = node_states(&bp, &ctx, Some(RunStatus::Running), None, &[]);
        // d waits for c (join all).
        assert_eq!(states(&views), ["done", "done", "running", "not-reached"]);
        let ctx = context(json!({"_outputs.a": 1, "_outputs.b": 2, "_awaitingNodeIds": ["c"]}));
        let views = node_states(&bp, &ctx, Some(RunStatus::Awaiting), None, &[]);
        assert_eq!(states(&views), ["done", "done", "awaiting", "not-reached"]);
        // A completed run's untaken branch was not reached.
        let ctx = context(json!({"_outputs.a": 1, "_outputs.b": 2, "_outputs.d": 3}));
        let views = node_states(&bp, &ctx, Some(RunStatus::Completed), None, &[]);
        assert_eq!(states(&views), ["done", "done", "not-reached", "done"]);
    }

    #[test]
    fn a_join_any_node_runs_after_its_first_predecessor() {
        let bp = bp(
            r#"{"id":"any","nodes":[{"id":"a","uses":"inc"},{"id":"b","uses":"inc"},
            {"id":"c","uses":"inc"},{"id":"d","uses":"inc","config":{"joinStrategy":"any"}}],
            "edges":[{"source":"a","target":"b"},{"source":"a","target":"c"},
                     {"source":"b","target":"d"},{"source":"c","target":"d"}]}"#,
        );
        let ctx = context(json!({"_outputs.a": 1, "_outputs.b": 2}));
        let views = node_states(&bp, &ctx, Some(RunStatus::Running), None, &[]);
        assert_eq!(states(&views), ["done", "done", "running", "running"]);
    }

    #[test]
    fn layers_follow_the_longest_forward_path() {
        // a → b → c → d and a → d: d sits after c; the back edge d → b changes nothing.
        let bp = bp(
            r#"{"id":"l","nodes":[{"id":"a","uses":"inc"},{"id":"b","uses":"inc",
              "config":{"joinStrategy":"any"}},{"id":"c","uses":"inc"},
              {"id":"d","uses":"loop-controller","params":{"condition":"false"}}],
            "edges":[{"source":"a","target":"b"},{"source":"b","target":"c"},
                     {"source":"c","target":"d"},{"source":"a","target":"d"},
                     {"source":"d","target":"b","action":"continue"}]}"#,
        );
        let l = layout(&bp);
        assert_eq!(l.layer, [0, 1, 2, 3]);
        // Room for the back edge below the nodes.
        assert!(l.height >= 2.0 * MARGIN + NODE_H + BACK_ROOM, "{l:?}");
        let svg = render_graph(
            &bp,
            &node_states(&bp, &Map::new(), Some(RunStatus::Running), None, &[]),
        );
        assert_eq!(svg.matches(r#"class="edge back""#).count(), 1, "{svg}");
        assert_eq!(svg.matches(r#"class="edge""#).count(), 4, "{svg}");
        assert!(svg.contains(">continue</text>"), "{svg}");
    }

    #[test]
    fn nodes_of_a_layer_do_not_overlap() {
        let bp = diamond();
        let l = layout(&bp);
        assert_eq!(l.layer, [0, 1, 1, 2]);
        let (b, c) = (l.position[1], l.position[2]);
        assert_eq!(b.0, c.0);
        assert!((b.1 - c.1).abs() >= NODE_H + GAP_Y, "{l:?}");
        for &(x, y) in &l.position {
            assert!(x + NODE_W <= l.width && y + NODE_H <= l.height, "{l:?}");
        }
    }

    #[test]
    fn the_graph_escapes_node_ids_and_errors() {
        let id = serde_json::to_string(HOSTILE).unwrap();
        let bp = bp(&format!(
            r#"{{"id":"x","nodes":[{{"id":{id},"uses":"inc"}},{{"id":"b","uses":"inc"}}],
                "edges":[{{"source":{id},"target":"b"}}]}}"#
        ));
        let reason = format!("node '{HOSTILE}' failed after 1 attempt(s): {HOSTILE}");
        let views = node_states(
            &bp,
            &Map::new(),
            Some(RunStatus::Failed),
            Some(&reason),
            &[],
        );
        assert_eq!(states(&views), ["failed", "not-reached"]);
        let svg = render_graph(&bp, &views);
        assert_no_markup_from_data(&svg);
        assert!(svg.contains(r#"class="node failed" data-node-id="&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" data-state="failed" data-error="node &#39;&lt;script&gt;"#), "{svg}");
    }

    #[test]
    fn the_run_page_escapes_what_comes_from_data() {
        let id = serde_json::to_string(HOSTILE).unwrap();
        let bp = bp(&format!(
            r#"{{"id":"x","nodes":[{{"id":{id},"uses":"inc"}}]}}"#
        ));
        let view = RunView {
            run_id: HOSTILE.into(),
            status: Some(StatusRow {
                run_id: HOSTILE.into(),
                status: RunStatus::Failed,
                updated_at: Some("2024-05-01T12:00:00.000Z".into()),
                result: Some(json!({"status": "failed", "reason": HOSTILE})),
            }),
            context: context(json!({"blueprintId": "x", "_awaitingDetails": {HOSTILE: HOSTILE}})),
            history: vec![execution(HOSTILE, "failed", Some(HOSTILE))],
            blueprint_id: Some("x".into()),
            blueprint: Some(&bp),
        };
        let page = render_run("/t/tok", &view);
        assert_no_markup_from_data(&page);
        assert!(page.contains(r#"data-state="failed""#), "{page}");
        assert!(page.contains(r#"href="/t/tok/runs/all/x""#), "{page}");
        // A finished run's page does not reload itself.
        assert!(!page.contains("http-equiv=\"refresh\""));
        // Not loaded: says so, escaped.
        let missing = RunView {
            blueprint_id: Some(HOSTILE.into()),
            blueprint: None,
            ..view
        };
        let page = render_run("", &missing);
        assert_no_markup_from_data(&page);
        assert!(page.contains("is not loaded here"));
    }

    #[test]
    fn the_runs_page_escapes_ids_and_links_with_the_prefix() {
        let view = RunsView {
            counts: vec![(RunStatus::Failed, 2), (RunStatus::Completed, 5)],
            status: Some(RunStatus::Failed),
            blueprint: Some(HOSTILE.into()),
            runs: vec![RunSummary {
                run_id: HOSTILE.into(),
                status: RunStatus::Failed,
                blueprint_id: Some(HOSTILE.into()),
                created_at: Some("2024-05-01T12:00:00.000Z".into()),
                updated_at: None,
            }],
            blueprints: vec!["b1".into()],
            throughput: Ok(vec![(0, 3)]),
            dead_letters: Err(HOSTILE.into()),
            queue: "jobs".into(),
        };
        let page = render_runs("/t/k", &view);
        assert_no_markup_from_data(&page);
        for (status, count) in [("failed", 2), ("completed", 5), ("all", 7), ("running", 0)] {
            let counted = format!(r#"data-status="{status}" data-count="{count}""#);
            assert!(page.contains(&counted), "{counted} in {page}");
        }
        assert!(page.contains(&format!(r#"href="/t/k/run/{}""#, encode_segment(HOSTILE))));
        assert!(page.contains(r#"href="/t/k/runs/failed/b1""#), "{page}");
        assert!(page.contains(r#"href="/t/k/dead-letters""#), "{page}");
        assert!(page.contains("jobs.dead"), "{page}");
    }

    #[test]
    fn the_dead_letters_page_escapes_bodies_and_reasons() {
        let letter = DeadLetter {
            reason: Some(HOSTILE.into()),
            body: HOSTILE.into(),
            bytes: 5000,
            run_id: Some(HOSTILE.into()),
            node_id: Some(HOSTILE.into()),
            timestamp: Some(0),
        };
        let peek = DeadLetterPeek {
            depth: 1,
            scanned: 1,
            latest: vec![letter],
            exists: true,
        };
        let page = render_dead_letters("", "q.dead", &Ok(peek));
        assert_no_markup_from_data(&page);
        assert!(page.contains(r#"data-depth="1""#), "{page}");
        assert!(page.contains("1970-01-01 00:00:00 UTC"), "{page}");
        assert!(page.contains("5000 bytes"), "{page}");
        let page = render_dead_letters("", "q.dead", &Err(HOSTILE.into()));
        assert_no_markup_from_data(&page);
    }

    #[test]
    fn a_dead_letters_body_is_cut_and_its_job_named() {
        let mut body = br#"{"runId":"r1","nodeId":"n1","pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 3000));
        body.extend(br#""}"#);
        let properties = amiquip::AmqpProperties::default().with_timestamp(7);
        let letter = DeadLetter::of(&body, &properties);
        assert_eq!(letter.bytes, body.len());
        assert_eq!(letter.body.len(), DEAD_LETTER_BODY_SHOWN);
        assert_eq!(letter.run_id.as_deref(), Some("r1"));
        assert_eq!(letter.node_id.as_deref(), Some("n1"));
        assert_eq!(letter.timestamp, Some(7));
        let reasoned = amqp::dead_letter_properties(&properties, "bad job");
        assert_eq!(
            DeadLetter::of(b"{not json", &reasoned).reason.as_deref(),
            Some("bad job")
        );
    }

    #[test]
    fn the_timeline_places_executions_in_time_and_escapes_them() {
        let mut first = execution("a", "completed", None);
        first.started_at = "2024-05-01T12:00:00.000Z".into();
        first.duration_ms = 100.0;
        let mut second = execution(HOSTILE, "failed", Some(HOSTILE));
        second.started_at = "2024-05-01T12:00:00.300Z".into();
        second.started_ms = first.started_ms + 300.0;
        second.duration_ms = 100.0;
        let svg = render_timeline(&[first, second]);
        assert_no_markup_from_data(&svg);
        // 400 ms in all: the second bar starts at 3/4 of the plot.
        assert!(svg.contains(r#"x="700.0""#), "{svg}");
        assert!(svg.contains(">400 ms</text>"), "{svg}");
        assert!(svg.contains(r#"class="exec failed""#), "{svg}");
        assert!(render_timeline(&[]).contains("No node executions"));
    }

    #[test]
    fn throughput_bars_stand_for_their_minute() {
        let svg = render_throughput(&[(29, 4), (0, 2), (45, 1)], 30);
        assert_eq!(svg.matches("<rect").count(), 30);
        assert!(svg.contains(r#"data-total="7""#), "{svg}");
        assert!(
            svg.contains("<title>2 execution(s), 0 min ago</title>"),
            "{svg}"
        );
        // Older than the window: counted in the oldest bar.
        assert!(
            svg.contains("<title>5 execution(s), 29 min ago</title>"),
            "{svg}"
        );
    }

    #[test]
    fn times_format() {
        assert_eq!(format_epoch(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_epoch(1_709_208_000), "2024-02-29 12:00:00 UTC");
        assert_eq!(
            short_time(Some("2024-05-01T12:34:56.789Z")),
            "2024-05-01 12:34:56"
        );
        assert_eq!(short_time(None), "—");
        assert_eq!(
            node_named_by("node 'a' b' failed after 1 attempt(s): x"),
            Some("a' b")
        );
        assert_eq!(node_named_by("unknown blueprint 'x'"), None);
        assert_eq!(
            failure_message("node 'a' failed after 2 attempt(s): x: y"),
            "x: y"
        );
        assert_eq!(
            failure_message("run failed: 1 attempt(s): x"),
            "run failed: 1 attempt(s): x"
        );
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
