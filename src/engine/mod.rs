//! The engine: what a workflow means, with no queue, database or cache.
//!
//! A [`blueprint`] is parsed and analysed once; [`expr`] compiles its conditions and
//! transforms; [`node`] is the API node code implements and the registry that maps `uses`
//! to it; [`executor`] runs one node (input, attempts, timeout, fallback); [`flow`] chooses a
//! finished node's successors and joins them; [`nodes`] are the built-ins; [`local`] runs a
//! whole run in this process; [`events`] are the lifecycle events and node middleware both
//! runners call. The distributed runtime calls the same executor and successor
//! rules, so both runners mean the same thing by a blueprint. Nothing here imports the
//! service adapters or the runtime.

pub mod blueprint;
pub mod builder;
pub mod events;
pub mod executor;
pub mod expr;
pub mod flow;
pub mod lint;
pub mod local;
pub mod node;
pub mod nodes;
pub mod registry;
