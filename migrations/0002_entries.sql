-- flowcraft-rabbitmq: a run's entries as rows (issue 11), so that a job reads and writes
-- only the keys it uses instead of the whole context.
--
-- {contexts}.context_data keeps the context a run starts with (as a seed-style client
-- inserts it); everything a run writes afterwards is a row of {entries}: outputs, inputs,
-- node bookkeeping, the awaiting keys and the nodes' own context writes. A row with a NULL
-- value is a deletion (it hides a key of the starting context). A run's context is its
-- starting context overlaid with its entries, assembled only when asked for (`status`,
-- the completed run's result).
CREATE TABLE IF NOT EXISTS {entries} (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value JSONB,
    PRIMARY KEY (run_id, key)
);

-- The keys every job reads (blueprintId, blueprintVersion, _parent, in that order), kept
-- beside the (possibly large) starting context so that reading them never decompresses it;
-- NULL when the starting context is not an object.
ALTER TABLE {contexts} ADD COLUMN IF NOT EXISTS header JSONB[] GENERATED ALWAYS AS (
    CASE WHEN jsonb_typeof(context_data) = 'object' THEN ARRAY[
        context_data -> 'blueprintId', context_data -> 'blueprintVersion', context_data -> '_parent']
    END) STORED;

-- Runs already under way: the keys only a run writes move to their own rows.
INSERT INTO {entries} (run_id, key, value)
SELECT c.run_id, e.key, e.value
FROM {contexts} c,
     jsonb_each(CASE WHEN jsonb_typeof(c.context_data) = 'object' THEN c.context_data ELSE '{}'::jsonb END) e
WHERE e.key LIKE '\_outputs.%' OR e.key LIKE '\_inputs.%' OR e.key LIKE '\_node.%'
   OR e.key LIKE '\_batch.%' OR e.key IN ('_awaitingNodeIds', '_awaitingDetails')
ON CONFLICT (run_id, key) DO NOTHING;

-- (The table is new: its rows are the keys just moved.)
UPDATE {contexts} c SET context_data = c.context_data - ARRAY(
    SELECT e.key FROM {entries} e WHERE e.run_id = c.run_id)
WHERE jsonb_typeof(c.context_data) = 'object'
  AND EXISTS (SELECT 1 FROM {entries} e WHERE e.run_id = c.run_id);
