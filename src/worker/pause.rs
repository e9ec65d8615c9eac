//! Pausing nodes in the distributed runtime (`wait`, `sleep`, `webhook`, `subflow`): what
//! their awaiting details become before the commit, and what happens right after it.

use serde_json::Value;

use crate::amqp::JobSink;
use crate::blueprint::{Blueprint, NodeDef};
use crate::protocol::JobPayload;

use super::{Shared, WorkerError};

/// Completes a pausing node's `_awaitingDetails` entry before it is committed.
pub(crate) fn prepare(
    _shared: &Shared,
    _bp: &Blueprint,
    _job: &JobPayload,
    _node: &NodeDef,
    details: Value,
) -> Result<Value, WorkerError> {
    Ok(details)
}

/// Runs after a pausing node's commit.
pub(crate) fn after_commit(
    _shared: &Shared,
    _bp: &Blueprint,
    _job: &JobPayload,
    _node: &NodeDef,
    _details: &Value,
    _publisher: &mut dyn JobSink,
) -> Result<(), WorkerError> {
    Ok(())
}
