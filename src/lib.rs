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
//! 2. **How jobs move** (RabbitMQ, PostgreSQL, Redis): added by the distributed modules.

pub mod blueprint;
pub mod executor;
pub mod expr;
pub mod flow;
pub mod local;
pub mod node;
pub mod nodes;

pub use blueprint::{Blueprint, BlueprintError};
pub use local::{LocalRuntime, RunStatus, WorkflowResult};
pub use node::{Node, NodeContext, NodeError, NodeRegistry, NodeResult};
