// Every public item is documented; the internals the `testing` feature exposes to our own
// tests are not part of the API, so they are held to it only without that feature
// (`cargo clippy --lib -- -D warnings`).
#![cfg_attr(not(feature = "testing"), warn(missing_docs))]
//! # flowcraft-rabbitmq
//!
//! Runs [Flowcraft](https://github.com/gorango/flowcraft) workflow blueprints — JSON graphs
//! of nodes and edges — in process or across many worker processes and hosts, with RabbitMQ
//! for jobs, PostgreSQL for each run's state and Redis for coordination. Everything is
//! blocking and thread-based: this crate starts no async runtime.
//!
//! - **In process**: [`LocalRuntime`] runs a [`Blueprint`] with a [`NodeRegistry`] of node
//!   implementations, no services needed.
//! - **Distributed**: [`RabbitMqAdapter`] is a worker pool — one consumer thread, a fixed
//!   pool of worker threads — that executes one node per job and publishes the successors;
//!   a delivery is acked only after its effects are committed and its successors confirmed.
//!   [`Client`] starts, reads, resumes and cancels runs; [`Reconciler`] resumes runs that
//!   stalled (the worker runs one on a timer); [`WebhookServer`] receives webhook calls.
//! - **Lower level**: [`PostgresContext`] reads and writes one run's context key by key;
//!   [`RedisCoordinationStore`] offers the coordination primitives.
//!
//! ```no_run
//! use flowcraft_rabbitmq::{connect_postgres, connect_redis, run_migrations};
//! use flowcraft_rabbitmq::{Blueprint, NodeRegistry, RabbitMqAdapter, Tables};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pg = connect_postgres("postgres://postgres@127.0.0.1:5432/postgres", 8)?;
//! let redis = connect_redis("redis://127.0.0.1:6379", 8)?;
//! run_migrations(&pg, &Tables::default())?;
//! let worker = RabbitMqAdapter::builder("amqp://guest:guest@127.0.0.1:5672/%2f", pg, redis)
//!     .registry(NodeRegistry::with_builtins())
//!     .blueprint(Blueprint::from_path("blueprints/greeting.json")?)
//!     .build()?
//!     .start()?;
//! worker.stop()?;
//! # Ok(())
//! # }
//! ```
//!
//! The source is laid out by what a file may touch: `vocabulary/` (words every layer
//! shares), `engine/` (what a workflow means; no I/O), `services/` (the only code that talks
//! to RabbitMQ, PostgreSQL or Redis), `runtime/` (how jobs move, through `services/`) and
//! `cli/` on top.

mod engine;
mod runtime;
mod services;
mod vocabulary;

#[doc(hidden)]
pub mod cli;

pub use engine::blueprint::{Blueprint, BlueprintError};
pub use engine::builder::Flow;
pub use engine::events::{EventBus, EventKind, EventListener, FlowEvent, Next, NodeMiddleware};
pub use engine::lint::{lint, Finding, Severity};
pub use engine::local::{LocalError, LocalRuntime, LocalRuntimeBuilder, WorkflowResult};
pub use engine::node::{ContextMap, Node, NodeContext, NodeError, NodeResult};
pub use engine::registry::NodeRegistry;
pub use runtime::client::Client;
pub use runtime::error::{Error, Result};
pub use runtime::reconciler::{Reconciler, ReconciliationStats};
pub use runtime::webhook::{WebhookOptions, WebhookServer};
pub use runtime::worker::{RabbitMqAdapter, RabbitMqAdapterBuilder, WorkerHandle};
pub use services::postgres::context::PostgresContext;
pub use services::postgres::migrate::migrate as run_migrations;
pub use services::postgres::store::{
    connect_pool as connect_postgres, PgPool, StatusRow, StoreError, Tables,
};
pub use services::rabbitmq::AmqpError;
pub use services::redis::{
    connect_pool as connect_redis, CoordinationError, RedisCoordinationStore, RedisPool,
};
pub use vocabulary::keys;
pub use vocabulary::RunStatus;

// The module paths of earlier versions, kept so that code written against them still
// builds (the error types are one `Error` now: `WorkerError`, `ClientError` and
// `ResumeError` name it, with its own variants). New code imports from the crate root.
#[doc(hidden)]
pub mod blueprint {
    pub use crate::engine::blueprint::*;
}
#[doc(hidden)]
pub mod expr {
    pub use crate::engine::expr::*;
}
#[doc(hidden)]
pub mod node {
    pub use crate::engine::node::*;
    pub use crate::engine::registry::NodeRegistry;
}
#[doc(hidden)]
pub mod local {
    pub use crate::engine::local::*;
    pub use crate::vocabulary::keys::{AWAITING_DETAILS, AWAITING_NODE_IDS};
    pub use crate::vocabulary::RunStatus;
}
#[doc(hidden)]
pub mod store {
    pub use crate::services::postgres::store::*;
}
#[doc(hidden)]
pub mod context {
    pub use crate::services::postgres::context::*;
}
#[doc(hidden)]
pub mod migrate {
    pub use crate::services::postgres::migrate::*;
}
#[doc(hidden)]
pub mod coordination {
    pub use crate::runtime::message::{job_id, parse_job_id};
    pub use crate::services::redis::*;
}
#[doc(hidden)]
pub mod worker {
    pub use crate::runtime::worker::*;
    /// The runtime's error, under its earlier name.
    pub type WorkerError = crate::Error;
}
#[doc(hidden)]
pub mod client {
    pub use crate::runtime::client::*;
    /// The runtime's error, under its earlier name.
    pub type ClientError = crate::Error;
}
#[doc(hidden)]
pub mod reconciler {
    pub use crate::runtime::reconciler::*;
}
#[doc(hidden)]
pub mod webhook {
    pub use crate::runtime::webhook::*;
}
#[doc(hidden)]
pub mod amqp {
    pub use crate::services::rabbitmq::*;
    pub use crate::services::url::mask_url;
}
#[doc(hidden)]
pub mod protocol {
    pub use crate::runtime::message::*;
}
#[doc(hidden)]
pub mod executor {
    pub use crate::engine::executor::*;
    pub use crate::vocabulary::keys::{INPUTS_PREFIX, OUTPUTS_PREFIX};
}
#[doc(hidden)]
pub mod flow {
    pub use crate::engine::flow::*;
    pub use crate::vocabulary::keys::{input_key, output_key};
}
#[doc(hidden)]
pub mod nodes {
    pub use crate::engine::nodes::*;
    pub use crate::vocabulary::keys::{batch_key, BATCH_PREFIX};
}
#[doc(hidden)]
pub mod scheduling {
    pub use crate::runtime::scheduling::*;
    pub use crate::vocabulary::keys::{meta_key, NODE_META_PREFIX};
}
#[doc(hidden)]
pub mod resume {
    pub use crate::runtime::resumer::*;
    pub use crate::vocabulary::keys::PARENT_KEY;
    /// The runtime's error, under its earlier name.
    pub type ResumeError = crate::Error;
}
#[doc(hidden)]
pub mod failpoint {
    pub use crate::runtime::failpoint::*;
}

/// Internals for this crate's integration tests and benches (feature `testing`); not a
/// stable API.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing {
    pub use crate::engine::{executor, flow, nodes};
    pub use crate::runtime::{failpoint, message, resumer, scheduling};
    pub use crate::services::{group, rabbitmq as amqp};

    /// [`RunStore::commit_nodes`](crate::services::postgres::store::RunStore::commit_nodes):
    /// a batch of commits a caller gathered itself (the worker's job tails).
    pub fn commit_nodes(
        store: &crate::services::postgres::store::RunStore,
        commits: Vec<(
            String,
            crate::services::postgres::store::NodeCommit,
            crate::services::postgres::store::CommitGuard,
        )>,
    ) -> Vec<Result<bool, crate::services::postgres::store::StoreError>> {
        store
            .commit_nodes(commits)
            .into_iter()
            .map(|r| r.map(|applied| applied.is_some()))
            .collect()
    }
}
