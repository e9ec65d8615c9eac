//! [`Client`]: start runs, read their status, resume and cancel them.
//!
//! `start_workflow` follows the seed client's protocol exactly — insert the context row,
//! insert a `running` status row, publish one persistent job per start node to the queue —
//! so runs started by any client written that way behave the same.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::engine::blueprint::Blueprint;
use crate::engine::executor::NodeSuccess;
use crate::engine::local::MAX_SUBFLOW_DEPTH;
use crate::engine::node::{ContextMap, NodeResult};
use crate::runtime::error::Error;
use crate::runtime::message::JobPayload;
use crate::runtime::resumer::Resumer;
use crate::runtime::worker::DEFAULT_QUEUE;
use crate::services::postgres::store::{PgPool, RunStore, StatusRow, Tables};
use crate::services::rabbitmq::{self as amqp, ConfirmPublisher, Declare, JobSink, KeptPublisher};
use crate::services::redis::{RedisCoordinationStore, RedisPool, DEFAULT_PREFIX};
use crate::vocabulary::keys::{AWAITING_DETAILS, BLUEPRINT_ID};
use crate::vocabulary::limits::{check_id, check_storable};
use crate::vocabulary::RunStatus;

/// Starts and steers runs. Opens its RabbitMQ connection on first use and keeps it.
pub struct Client {
    store: RunStore,
    coord: RedisCoordinationStore,
    blueprints: HashMap<String, Arc<Blueprint>>,
    queue: String,
    public_url: String,
    publisher: KeptPublisher,
}

impl Client {
    /// A client with default table names, queue and key prefix.
    pub fn new(amqp_url: impl Into<String>, pg: PgPool, redis: RedisPool) -> Result<Client, Error> {
        Client::with_options(
            amqp_url,
            pg,
            redis,
            Tables::default(),
            DEFAULT_QUEUE,
            DEFAULT_PREFIX,
        )
    }

    /// A client with explicit table names, queue and Redis key prefix.
    pub fn with_options(
        amqp_url: impl Into<String>,
        pg: PgPool,
        redis: RedisPool,
        tables: Tables,
        queue: &str,
        redis_prefix: &str,
    ) -> Result<Client, Error> {
        let declared = queue.to_string();
        let declare: Declare = Box::new(move |channel| amqp::declare_job_queue(channel, &declared));
        Ok(Client {
            store: RunStore::new(pg, tables)?,
            coord: RedisCoordinationStore::new(redis, redis_prefix),
            blueprints: HashMap::new(),
            publisher: KeptPublisher::new(amqp_url, declare),
            queue: queue.to_string(),
            public_url: crate::runtime::worker::DEFAULT_PUBLIC_URL.to_string(),
        })
    }

    /// Adds blueprints the client may start and resume.
    pub fn with_blueprints(mut self, bps: impl IntoIterator<Item = Blueprint>) -> Self {
        crate::engine::blueprint::add_blueprints(&mut self.blueprints, bps);
        self
    }

    /// Base URL of webhook endpoints (default `http://127.0.0.1:8080`).
    pub fn with_public_url(mut self, url: impl Into<String>) -> Self {
        self.public_url = url.into();
        self
    }

    /// Registers the webhook endpoint of a run's node (SPEC §6) and returns `{url, event}`.
    /// Workers do this themselves when a `webhook` node runs.
    pub fn register_webhook_endpoint(
        &self,
        run_id: &str,
        node_id: &str,
    ) -> Result<crate::runtime::webhook::WebhookEndpoint, Error> {
        Ok(crate::runtime::webhook::register_endpoint(
            &self.store,
            &self.public_url,
            run_id,
            node_id,
        )?)
    }

    /// The run store (status queries, tests).
    pub fn store(&self) -> &RunStore {
        &self.store
    }

    fn with_publisher<T>(
        &self,
        f: impl FnOnce(&mut ConfirmPublisher) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.publisher.with(f, |e| matches!(e, Error::RabbitMq(_)))
    }

    /// Starts a run: context row, `running` status row, one job per start node. Returns the
    /// run id.
    pub fn start_workflow(
        &self,
        blueprint_id: &str,
        initial_context: ContextMap,
    ) -> Result<String, Error> {
        let run_id = uuid::Uuid::new_v4().to_string();
        self.start(blueprint_id, &run_id, initial_context, false)?;
        Ok(run_id)
    }

    /// Starts a run with the caller's run id, so that the caller may retry safely: if the
    /// run exists already (of this blueprint), its start jobs are queued again — harmless
    /// copies if they ran — and nothing else changes. A run id of another blueprint's run is
    /// refused ([`Error::RunExists`]).
    pub fn start_workflow_with_id(
        &self,
        blueprint_id: &str,
        run_id: &str,
        initial_context: ContextMap,
    ) -> Result<(), Error> {
        check_id("the run id", run_id).map_err(|reason| Error::InvalidRunId { reason })?;
        self.start(blueprint_id, run_id, initial_context, true)
    }

    /// Creates the run's rows (or, with `retry`, finds them), then publishes its start jobs.
    /// If publishing fails after the rows were written, the run is marked stalled — the
    /// reconciler's next pass starts it — and the error says so.
    fn start(
        &self,
        blueprint_id: &str,
        run_id: &str,
        initial_context: ContextMap,
        retry: bool,
    ) -> Result<(), Error> {
        let bp = self
            .blueprints
            .get(blueprint_id)
            .ok_or_else(|| Error::UnknownBlueprint(blueprint_id.to_string()))?;
        let mut context = initial_context;
        storable("the context", &Value::Object(context.clone()))?;
        bp.stamp(&mut context);
        let created = if retry {
            self.store.create_run_if_absent(run_id, &context)?
        } else {
            self.store.create_run(run_id, &context)?;
            true
        };
        if !created {
            let Some(existing) = self.store.load_keys(run_id, vec![BLUEPRINT_ID.into()])? else {
                return Err(Error::UnknownRun(run_id.into()));
            };
            let theirs = Blueprint::stamped_id(&existing.context);
            if theirs != bp.id() {
                return Err(Error::RunExists {
                    run: run_id.into(),
                    blueprint: theirs.to_string(),
                });
            }
            if existing.status != Some(RunStatus::Running) {
                // Started before, and it has moved on.
                return Ok(());
            }
        }
        let bodies: Vec<Vec<u8>> = bp
            .start_node_ids()
            .iter()
            .map(|n| {
                let mut job = JobPayload::new(run_id, bp.id(), n, 0);
                // A start job queued again is a copy, like the reconciler's.
                job.recovered = !created;
                job.to_body()
            })
            .collect();
        if let Err(e) = self.with_publisher(|p| Ok(p.publish_jobs("", &self.queue, &bodies)?)) {
            if let Err(mark) = self.store.mark_stalled(run_id) {
                log::warn!("run {run_id}: cannot mark it for the reconciler: {mark}");
            }
            return Err(Error::StartNotQueued {
                run: run_id.into(),
                source: Box::new(e),
            });
        }
        if created {
            log::info!("run {run_id}: started ({blueprint_id})");
        } else {
            log::info!("run {run_id}: start jobs queued again ({blueprint_id})");
        }
        Ok(())
    }

    /// A run's status row (`None` if unknown).
    pub fn status(&self, run_id: &str) -> Result<Option<StatusRow>, Error> {
        Ok(self.store.status(run_id)?)
    }

    /// Polls a run's status until it is no longer `running` — `completed`, `failed`,
    /// `cancelled` or `awaiting` — or `timeout` has passed; returns the last status row
    /// (still `running` on timeout).
    pub fn wait(&self, run_id: &str, timeout: Duration) -> Result<StatusRow, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self
                .status(run_id)?
                .ok_or_else(|| Error::UnknownRun(run_id.into()))?;
            if row.status != RunStatus::Running || Instant::now() >= deadline {
                return Ok(row);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resumes a paused run: `_resume.action`/`_resume.output` are set, `output` becomes every
    /// awaited node's output, and the run continues along the edges matching `action`.
    /// Resuming a run that is not awaiting is an error; resuming twice applies once.
    pub fn resume_with_action(
        &self,
        run_id: &str,
        action: Option<&str>,
        output: Value,
    ) -> Result<Vec<String>, Error> {
        self.resume_nodes(run_id, None, action, output)
    }

    /// Resumes only the named awaited nodes.
    pub fn resume_nodes(
        &self,
        run_id: &str,
        nodes: Option<&[String]>,
        action: Option<&str>,
        output: Value,
    ) -> Result<Vec<String>, Error> {
        storable("the output", &output)?;
        if let Some(action) = action {
            storable("the action", &Value::String(action.into()))?;
        }
        let Some(snapshot) = self.store.load(run_id)? else {
            return Err(Error::UnknownRun(run_id.into()));
        };
        if snapshot.status != Some(RunStatus::Awaiting) {
            return Err(Error::NotAwaiting {
                run: run_id.into(),
                status: snapshot.status.map_or("unknown", RunStatus::as_str).into(),
            });
        }
        self.with_publisher(|publisher| {
            let resumer = Resumer::new(&self.store, &self.coord, &self.blueprints, &self.queue);
            let result = NodeResult {
                output,
                action: action.map(String::from),
                ..NodeResult::default()
            };
            let outcome =
                resumer.resume(run_id, snapshot, nodes, NodeSuccess::of(result), publisher)?;
            Ok(outcome.nodes)
        })
    }

    /// Cancels a running or awaiting run: status `cancelled`; its queued jobs are dropped.
    ///
    /// Workers raise the cancellation flag of the run's executing node within half a second
    /// (an `exec` node's program is killed), and the run's subflow children that are still
    /// running or awaiting are cancelled too.
    pub fn cancel(&self, run_id: &str) -> Result<(), Error> {
        if self.store.cancel_run(run_id)? {
            log::info!("run {run_id}: cancelled");
            self.cancel_children(run_id, 0)?;
            return Ok(());
        }
        match self.store.status(run_id)? {
            None => Err(Error::UnknownRun(run_id.into())),
            Some(row) => Err(Error::NotCancellable {
                run: run_id.into(),
                status: row.status.to_string(),
            }),
        }
    }
}

impl Client {
    /// Cancels the subflow children a cancelled run awaits, and theirs.
    fn cancel_children(&self, run_id: &str, depth: usize) -> Result<(), Error> {
        if depth >= MAX_SUBFLOW_DEPTH {
            return Ok(());
        }
        let Some(snapshot) = self.store.load(run_id)? else {
            return Ok(());
        };
        let children: Vec<String> = snapshot
            .context
            .get(AWAITING_DETAILS)
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|details| details.values())
            .filter_map(|d| d.get("childRunId").and_then(Value::as_str))
            .map(String::from)
            .collect();
        for child in children {
            if self.store.cancel_run(&child)? {
                log::info!("run {child}: cancelled with its parent {run_id}");
                self.cancel_children(&child, depth + 1)?;
            }
        }
        Ok(())
    }
}

/// Refuses a value PostgreSQL cannot store, before anything is written.
fn storable(what: &str, value: &Value) -> Result<(), Error> {
    check_storable(what, value, 0)
        .map(drop)
        .map_err(|reason| Error::Unstorable { reason })
}
