-- flowcraft-rabbitmq: run history (issue 14).
--
-- One row per node execution (attempt), written in the same transaction as the commit it
-- belongs to: a node that completed or paused, and the attempts that failed (retried, or
-- failing the run). `flowcraft inspect` and the dashboard read it; `flowcraft prune` removes
-- finished runs with their history.
CREATE TABLE IF NOT EXISTS {history} (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INT NOT NULL DEFAULT 0,
    attempt INT NOT NULL DEFAULT 1,
    -- completed | awaiting | retried | failed
    outcome TEXT NOT NULL,
    error TEXT,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    -- host:pid of the worker process
    worker TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {history_index} ON {history} (run_id, started_at);
-- Recent executions, for throughput over the last minutes (BRIN: rows arrive in time
-- order, and it costs next to nothing per insert).
CREATE INDEX IF NOT EXISTS {history_time_index} ON {history} USING brin (finished_at);

-- When a run started, for `flowcraft runs` and `flowcraft prune`.
ALTER TABLE {statuses} ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ DEFAULT NOW();
