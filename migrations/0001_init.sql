-- flowcraft-rabbitmq: run state tables.
-- {contexts}, {statuses} and {webhooks} are replaced by the configured (validated) table names.

-- One JSONB context per run (flat keys: "_outputs.n1" is one key).
CREATE TABLE IF NOT EXISTS {contexts} (
    run_id TEXT PRIMARY KEY,
    context_data JSONB NOT NULL
);

-- One status row per run: running | awaiting | completed | failed | cancelled.
CREATE TABLE IF NOT EXISTS {statuses} (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    result JSONB
);

-- Webhook endpoints registered by webhook nodes.
CREATE TABLE IF NOT EXISTS {webhooks} (
    webhook_id TEXT PRIMARY KEY,
    event_name TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at TIMESTAMPTZ DEFAULT NOW()
);

-- The reconciler looks for running runs idle for a while.
CREATE INDEX IF NOT EXISTS {statuses_index} ON {statuses} (status, updated_at);
