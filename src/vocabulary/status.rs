//! [`RunStatus`]: the state of a run, as status rows, JSON and both runners spell it.

use serde::{Deserialize, Serialize};

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Started and not ended or paused; the in-process runner never returns it.
    Running,
    /// Paused until a resume: `wait`, `sleep`, `webhook` or `subflow` nodes are awaited.
    Awaiting,
    /// Ended with nothing left to do.
    Completed,
    /// Ended because a node failed with no fallback left, or the run could not go on.
    Failed,
    /// Ended by a cancel while running or awaiting; its queued jobs are dropped.
    Cancelled,
}

impl RunStatus {
    /// Every status, in the order a run may go through them.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Running,
        RunStatus::Awaiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The lowercase name used in status rows and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Awaiting => "awaiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the run has ended: `completed`, `failed` or `cancelled`.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "running" => RunStatus::Running,
            "awaiting" => RunStatus::Awaiting,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with a status name, as status rows spelled it when their status was a string.
impl PartialEq<str> for RunStatus {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RunStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
