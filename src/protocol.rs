//! The job message: `{"runId", "blueprintId", "nodeId", "attempt"?, "isLastAttempt"?,
//! "iteration"?}` — one job = "execute node N of run R".
//!
//! `iteration` is our extension (absent = 0): the how-manieth execution of a node on a
//! cycle this job is for, so the idempotency guard and the join keys tell loop iterations
//! apart. Messages from the seed client, without it, work unchanged.

use serde::{Deserialize, Serialize};

/// A job payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobPayload {
    pub run_id: String,
    pub blueprint_id: String,
    pub node_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_last_attempt: Option<bool>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iteration: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl JobPayload {
    /// A first-attempt job.
    pub fn new(run_id: &str, blueprint_id: &str, node_id: &str, iteration: u32) -> JobPayload {
        JobPayload {
            run_id: run_id.to_string(),
            blueprint_id: blueprint_id.to_string(),
            node_id: node_id.to_string(),
            attempt: Some(1),
            is_last_attempt: None,
            iteration,
        }
    }

    /// Parses and checks a message body; the error says what is wrong with it.
    pub fn parse(body: &[u8]) -> Result<JobPayload, String> {
        let job: JobPayload =
            serde_json::from_slice(body).map_err(|e| format!("malformed job message: {e}"))?;
        for (field, value) in [
            ("runId", &job.run_id),
            ("blueprintId", &job.blueprint_id),
            ("nodeId", &job.node_id),
        ] {
            if value.trim().is_empty() {
                return Err(format!("malformed job message: \"{field}\" is empty"));
            }
        }
        Ok(job)
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
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
