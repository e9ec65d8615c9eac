//! Crash injection for tests of crash safety: with `FLOWCRAFT_FAILPOINT=<point>:<nodeId>` in
//! the environment, the process exits at once (code 86, no cleanup, no ack) when it reaches
//! `<point>` for that node. Points: `after_commit`, `before_coordinate` (its successors no join
//! holds published, its Redis step not run), `after_publish`. Read once; costs one
//! pointer comparison per job when unset.

use std::sync::OnceLock;

static FAILPOINT: OnceLock<Option<String>> = OnceLock::new();

/// Exit code of a process stopped by a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 86;

pub(crate) fn hit(point: &str, node_id: &str) {
    let Some(configured) = FAILPOINT.get_or_init(|| std::env::var("FLOWCRAFT_FAILPOINT").ok())
    else {
        return;
    };
    if configured.split_once(':') == Some((point, node_id)) {
        eprintln!("flowcraft: failpoint {point}:{node_id} reached; exiting");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}
