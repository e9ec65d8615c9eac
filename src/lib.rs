//! # flowcraft-rabbitmq
//!
//! Runs [Flowcraft](https://github.com/gorango/flowcraft) workflow blueprints — JSON DAGs of
//! nodes and edges — in process or across many worker processes and hosts, with RabbitMQ for
//! jobs, PostgreSQL for each run's state and Redis for coordination. Everything is blocking
//! and thread-based: no async runtime is started by this crate.
//!
//! Read the modules in this order:
//!
//! 1. **What a workflow means** (no I/O): [`blueprint`] (model, validation, analysis),
//!    [`expr`] (the safe expression language of conditions and transforms), [`node`] (the
//!    node API and registry), [`executor`] (one node: input, retries, timeout, fallback),
//!    [`flow`] (choosing successors, joins), [`nodes`] (built-in nodes) and [`local`] (the
//!    in-process runner).
//! 2. **How jobs move** (RabbitMQ, PostgreSQL, Redis): [`protocol`] (the job message),
//!    [`amqp`] (connections with TCP_NODELAY, queues, publisher confirms), [`store`] (the
//!    context and status rows, one-statement commits), [`context`] (the public
//!    [`PostgresContext`]), [`coordination`] (Redis joins, locks and the run's job ledger),
//!    [`scheduling`] (what runs next), [`worker`] (the consumer thread, worker pool and the
//!    per-job protocol).
//! 3. **Steering runs**: [`client`] (start, status, resume, cancel), [`resume`] and
//!    [`reconciler`] (stalled runs).

pub mod amqp;
pub mod blueprint;
pub mod client;
pub mod context;
pub mod coordination;
pub mod executor;
pub mod expr;
pub mod failpoint;
pub mod flow;
mod group;
pub mod local;
pub mod migrate;
pub mod node;
pub mod nodes;
pub mod protocol;
pub mod reconciler;
pub mod resume;
pub mod scheduling;
pub mod store;
pub mod webhook;
pub mod worker;

pub use blueprint::{Blueprint, BlueprintError};
pub use client::Client;
pub use context::PostgresContext;
pub use coordination::RedisCoordinationStore;
pub use local::{LocalRuntime, RunStatus, WorkflowResult};
pub use node::{Node, NodeContext, NodeError, NodeRegistry, NodeResult};
pub use reconciler::{Reconciler, ReconciliationStats};
pub use worker::{RabbitMqAdapter, WorkerHandle};
