//! [`RabbitMqAdapterBuilder`]: the worker's options, their defaults and their validation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::blueprint::Blueprint;
use crate::engine::local::DEFAULT_MAX_ITERATIONS;
use crate::engine::registry::NodeRegistry;
use crate::runtime::error::{Error, Result};
use crate::runtime::metrics::Metrics;
use crate::services::postgres::store::{PgPool, RunStore, Tables};
use crate::services::rabbitmq as amqp;
use crate::services::redis::{RedisCoordinationStore, RedisPool, DEFAULT_PREFIX};

use super::adapter::RabbitMqAdapter;
use super::read_ahead::ReadAhead;
use super::shared::Shared;

/// Default job queue.
pub const DEFAULT_QUEUE: &str = "flowcraft-jobs";
/// Default fanout exchange of webhook events.
pub const DEFAULT_EVENTS_EXCHANGE: &str = "flowcraft-events";
/// Default base of webhook URLs.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

impl RabbitMqAdapter {
    /// A builder from the three services: an AMQP URL, a PostgreSQL pool and a Redis pool.
    pub fn builder(
        amqp_url: impl Into<String>,
        pg: PgPool,
        redis: RedisPool,
    ) -> RabbitMqAdapterBuilder {
        RabbitMqAdapterBuilder {
            amqp_url: amqp_url.into(),
            pg,
            redis,
            blueprints: HashMap::new(),
            registry: NodeRegistry::with_builtins(),
            queue: DEFAULT_QUEUE.into(),
            tables: Tables::default(),
            threads: 4,
            prefetch: None,
            redis_prefix: DEFAULT_PREFIX.into(),
            reconcile_every: Some(Duration::from_secs(30)),
            stalled_after: Duration::from_secs(300),
            max_iterations: DEFAULT_MAX_ITERATIONS,
            connection_name: None,
            public_url: DEFAULT_PUBLIC_URL.into(),
            events_exchange: DEFAULT_EVENTS_EXCHANGE.into(),
            metrics_listen: None,
            record_history: true,
        }
    }
}

/// Builder of the distributed worker ([`RabbitMqAdapter`]).
pub struct RabbitMqAdapterBuilder {
    amqp_url: String,
    pg: PgPool,
    redis: RedisPool,
    blueprints: HashMap<String, Arc<Blueprint>>,
    registry: NodeRegistry,
    queue: String,
    tables: Tables,
    threads: usize,
    prefetch: Option<u16>,
    redis_prefix: String,
    reconcile_every: Option<Duration>,
    stalled_after: Duration,
    max_iterations: u32,
    connection_name: Option<String>,
    public_url: String,
    events_exchange: String,
    metrics_listen: Option<String>,
    record_history: bool,
}

impl RabbitMqAdapterBuilder {
    /// Base URL of webhook endpoints as callers reach them (default `http://127.0.0.1:8080`).
    pub fn public_url(mut self, url: impl Into<String>) -> Self {
        self.public_url = url.into();
        self
    }

    /// The fanout exchange webhook events are published to (default `flowcraft-events`).
    pub fn events_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.events_exchange = exchange.into();
        self
    }

    /// A name reported to RabbitMQ for the worker's connection (client property
    /// `information`), so operators can tell workers apart.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Adds a blueprint.
    pub fn blueprint(self, bp: Blueprint) -> Self {
        self.blueprints([bp])
    }

    /// Adds blueprints.
    pub fn blueprints(mut self, bps: impl IntoIterator<Item = Blueprint>) -> Self {
        crate::engine::blueprint::add_blueprints(&mut self.blueprints, bps);
        self
    }

    /// The node registry (default: the built-ins only).
    pub fn registry(mut self, registry: NodeRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Job queue name (default `flowcraft-jobs`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Table names (default `flowcraft_contexts`, `flowcraft_statuses`, `flowcraft_webhooks`).
    pub fn tables(mut self, tables: Tables) -> Self {
        self.tables = tables;
        self
    }

    /// Worker threads (default 4).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Unacked deliveries in flight (default 8 × threads). A delivery stays unacked until the
    /// broker confirms the successors it published, a little after its work is done, and
    /// threads hand off their jobs' tails, so a process holds more jobs than threads; with
    /// only 2 × threads the workers starve (measured on `chain5` with 8 threads: 2 964–3 520
    /// jobs/s with 2 × threads, 4 356–6 881 with 8 ×).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// Redis key prefix (default `flowcraft:`).
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }

    /// Reconciler interval (default 30 s; `None` disables the timer thread).
    pub fn reconcile_every(mut self, every: Option<Duration>) -> Self {
        self.reconcile_every = every;
        self
    }

    /// How long a `running` run may be idle before the reconciler resumes it (default 300 s),
    /// and an `awaiting` run before the reconciler sends an overdue wake-up of it again.
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = after;
        self
    }

    /// How often one node may execute in one run (loops; default 1 000).
    pub fn max_iterations(mut self, n: u32) -> Self {
        self.max_iterations = n.max(1);
        self
    }

    /// Serve `GET /metrics` (Prometheus), `/healthz` and `/readyz` on `addr` (default: not
    /// served); [`WorkerHandle::metrics_addr`](super::WorkerHandle::metrics_addr) says where.
    pub fn metrics_listen(mut self, addr: impl Into<String>) -> Self {
        self.metrics_listen = Some(addr.into());
        self
    }

    /// Whether each node execution is recorded in the run's history (default: yes; see
    /// `flowcraft inspect`). Off, a job writes one row less.
    pub fn record_history(mut self, record: bool) -> Self {
        self.record_history = record;
        self
    }

    /// Validates the options.
    pub fn build(self) -> Result<RabbitMqAdapter> {
        if self.queue.trim().is_empty() {
            return Err(Error::InvalidOption("the queue name is empty"));
        }
        amqp::AmqpUrl::parse(&self.amqp_url)?;
        let store = RunStore::new(self.pg, self.tables)?;
        let metrics = Arc::new(Metrics::new());
        let read_ahead = ReadAhead::counted_in(metrics.read_ahead.clone());
        let coord = RedisCoordinationStore::new(self.redis, self.redis_prefix);
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(self.threads * 8).unwrap_or(u16::MAX));
        Ok(RabbitMqAdapter {
            shared: Arc::new(Shared {
                blueprints: self.blueprints,
                registry: self.registry,
                store,
                coord,
                queue: self.queue,
                max_iterations: self.max_iterations,
                public_url: self.public_url,
                events_exchange: self.events_exchange,
                executing: Mutex::new(HashMap::new()),
                metrics,
                worker_name: super::shared::process_name(),
                record_history: self.record_history,
                read_ahead,
            }),
            metrics_listen: self.metrics_listen,
            amqp_url: self.amqp_url,
            threads: self.threads,
            prefetch,
            reconcile_every: self.reconcile_every,
            stalled_after: self.stalled_after,
            connection_name: self.connection_name,
        })
    }
}
