//! The job message: `{"runId", "blueprintId", "nodeId", "attempt"?, "isLastAttempt"?,
//! "iteration"?}` — one job = "execute node N of run R".
//!
//! `iteration` is our extension (absent = 0): the how-manieth execution of a node on a
//! cycle this job is for, so the idempotency guard and the join keys tell loop iterations
//! apart. Messages from the seed client, without it, work unchanged.

use serde::{Deserialize, Serialize};

use crate::vocabulary::limits::{check_id, check_storable, MAX_MESSAGE_BYTES};

/// A job payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobPayload {
    /// Id of the run.
    pub run_id: String,
    /// Id of the run's blueprint.
    pub blueprint_id: String,
    /// Id of the node to execute (a blueprint node or a batch worker).
    pub node_id: String,
    /// The seed format's attempt number: sent as 1, never read (retries run within one job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The seed format's last-attempt flag: never sent or read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_last_attempt: Option<bool>,
    /// The loop iteration this job is for (our extension; 0 outside loops and when absent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iteration: u32,
    /// A `sleep` node's wake-up (our extension): resume the node instead of executing it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub timer: bool,
    /// Republished by the reconciler (our extension): like a redelivery, a copy of a
    /// committed job whose coordination may never have happened, so it re-derives the
    /// successors.
    #[serde(default, skip_serializing_if = "is_false")]
    pub recovered: bool,
    /// Sent by the reconciler (our extension) for a paused node whose wake-up was lost (a
    /// sleep's timer, a child run's notice): if the node still awaits at this iteration,
    /// what follows its pause is repeated; otherwise the job does nothing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wake: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An event published to the events exchange by the webhook receiver:
/// `{"event": "webhook:<run>:<node>", "payload": …}` (plus `runId`/`nodeId`, our extension,
/// so ids containing `:` need no parsing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMessage {
    /// The event name: `webhook:<run>:<node>` for a webhook call.
    pub event: String,
    /// The webhook call's JSON body, which becomes the node's output (`null` when absent).
    #[serde(default)]
    pub payload: serde_json::Value,
    /// The run the event is for (our extension); when `None`, parsed from `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The node the event is for (our extension); when `None`, parsed from `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The loop iteration of the pause the call is for (our extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
}

impl EventMessage {
    /// The event of a webhook node.
    pub fn webhook(
        run_id: &str,
        node_id: &str,
        iteration: u32,
        payload: serde_json::Value,
    ) -> EventMessage {
        EventMessage {
            event: webhook_event_name(run_id, node_id),
            payload,
            run_id: Some(run_id.to_string()),
            node_id: Some(node_id.to_string()),
            iteration: Some(iteration),
        }
    }

    /// The run and node a webhook event is for.
    pub fn webhook_target(&self) -> Option<(String, String)> {
        if let (Some(r), Some(n)) = (&self.run_id, &self.node_id) {
            return Some((r.clone(), n.clone()));
        }
        let rest = self.event.strip_prefix("webhook:")?;
        let (run, node) = rest.split_once(':')?;
        Some((run.to_string(), node.to_string()))
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks what a worker relies on: a webhook event names a usable run and node, and
    /// carries a payload PostgreSQL can store.
    fn validated(self) -> Result<EventMessage, String> {
        let malformed = |problem: String| format!("malformed event message: {problem}");
        if let Some((run, node)) = self.webhook_target() {
            check_id("its run id", &run).map_err(malformed)?;
            check_id("its node id", &node).map_err(malformed)?;
        }
        check_storable("its payload", &self.payload, 0).map_err(malformed)?;
        Ok(self)
    }
}

/// `webhook:<run>:<node>`.
pub fn webhook_event_name(run_id: &str, node_id: &str) -> String {
    format!("webhook:{run_id}:{node_id}")
}

/// A message on the job queue: a job, or an event routed there from the events exchange.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A job: execute (or, for a timer or wake job, resume) one node of a run.
    Job(JobPayload),
    /// An event from the events exchange: a webhook call.
    Event(EventMessage),
}

impl Message {
    /// Parses a message body; the error says what is wrong with it. A body over
    /// [`MAX_MESSAGE_BYTES`] is refused unread.
    pub fn parse(body: &[u8]) -> Result<Message, String> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "the message is {} bytes long (at most {MAX_MESSAGE_BYTES})",
                body.len()
            ));
        }
        // Jobs are nearly every message: read one straight from the bytes, and look closer
        // only at what is not a job.
        let not_a_job = match JobPayload::parse(body) {
            Ok(job) => return Ok(Message::Job(job)),
            Err(e) => e,
        };
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("malformed message: {e}"))?;
        if value.get("event").is_some() && value.get("blueprintId").is_none() {
            let event: EventMessage = serde_json::from_value(value)
                .map_err(|e| format!("malformed event message: {e}"))?;
            return event.validated().map(Message::Event);
        }
        Err(not_a_job)
    }
}

impl JobPayload {
    /// `run <run> node <node>`, for messages and logs.
    pub fn describe(&self) -> String {
        format!("run {} node {}", self.run_id, self.node_id)
    }

    /// A first-attempt job.
    pub fn new(run_id: &str, blueprint_id: &str, node_id: &str, iteration: u32) -> JobPayload {
        JobPayload {
            run_id: run_id.to_string(),
            blueprint_id: blueprint_id.to_string(),
            node_id: node_id.to_string(),
            attempt: Some(1),
            is_last_attempt: None,
            iteration,
            timer: false,
            recovered: false,
            wake: false,
        }
    }

    /// Parses and checks a message body; the error says what is wrong with it.
    pub fn parse(body: &[u8]) -> Result<JobPayload, String> {
        let job: JobPayload =
            serde_json::from_slice(body).map_err(|e| format!("malformed job message: {e}"))?;
        job.validated()
    }

    /// Checks the fields a worker relies on.
    fn validated(self) -> Result<JobPayload, String> {
        let job = self;
        if job.iteration >= i32::MAX as u32 {
            return Err(format!(
                "malformed job message: \"iteration\" {} is out of range",
                job.iteration
            ));
        }
        for (field, value) in [
            ("runId", &job.run_id),
            ("blueprintId", &job.blueprint_id),
            ("nodeId", &job.node_id),
        ] {
            check_id(&format!("\"{field}\""), value)
                .map_err(|problem| format!("malformed job message: {problem}"))?;
        }
        Ok(job)
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The node and iteration of a job id (see [`job_id`]).
pub fn parse_job_id(job: &str) -> (String, u32) {
    match job.rsplit_once('@') {
        Some((node, iteration)) => match iteration.parse() {
            Ok(i) => (node.to_string(), i),
            Err(_) => (job.to_string(), 0),
        },
        None => (job.to_string(), 0),
    }
}

/// A job's identity within its run — in the run's job ledger, its locks and its joins: the
/// node id, with `@<iteration>` for later loop iterations.
pub fn job_id(node: &str, iteration: u32) -> String {
    if iteration == 0 {
        node.to_string()
    } else {
        format!("{node}@{iteration}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_messages_parse() {
        let j = JobPayload::parse(br#"{"runId":"r","blueprintId":"b","nodeId":"n"}"#).unwrap();
        assert_eq!((j.iteration, j.attempt), (0, None));
        let body = JobPayload::new("r", "b", "n", 2).to_body();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"runId":"r","blueprintId":"b","nodeId":"n","attempt":1,"iteration":2})
        );
    }

    #[test]
    fn events_and_jobs_are_told_apart() {
        let e = Message::parse(br#"{"event":"webhook:r1:n1","payload":{"ok":true}}"#).unwrap();
        match e {
            Message::Event(e) => assert_eq!(e.webhook_target(), Some(("r1".into(), "n1".into()))),
            other => panic!("{other:?}"),
        }
        let j = Message::parse(br#"{"runId":"r","blueprintId":"b","nodeId":"n","timer":true}"#)
            .unwrap();
        assert!(matches!(j, Message::Job(JobPayload { timer: true, .. })));
        assert!(Message::parse(b"[]").is_err());
    }

    #[test]
    fn malformed_messages_are_explained() {
        assert!(JobPayload::parse(b"not json")
            .unwrap_err()
            .contains("malformed"));
        assert!(JobPayload::parse(br#"{"runId":"r","nodeId":"n"}"#)
            .unwrap_err()
            .contains("blueprintId"));
        assert!(
            JobPayload::parse(br#"{"runId":"","blueprintId":"b","nodeId":"n"}"#)
                .unwrap_err()
                .contains("runId")
        );
    }
}
