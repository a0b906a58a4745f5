-- The Batches API: a batch's deadline, and the indexes its hot queries need.

-- The end of the completion window: runs not started by then are cancelled and the batch
-- ends `expired`. The window as the client wrote it stays in `completion_window`.
ALTER TABLE batches ADD COLUMN expires_at TIMESTAMPTZ;
-- Set by `POST …/cancel`; the batch ends `cancelled` once no run of it is active.
ALTER TABLE batches ADD COLUMN cancel_requested_at TIMESTAMPTZ;

-- A `custom_id` names one line of a batch: unique within it. Results are served in
-- `custom_id` order, keyset-paginated on this index.
DROP INDEX runs_batch;
CREATE UNIQUE INDEX runs_batch_custom_id ON runs (batch_id, custom_id) WHERE batch_id IS NOT NULL;

-- "Has this batch any run left?", asked after every batch run ends: an index probe instead
-- of a scan of the batch's runs.
CREATE INDEX runs_batch_active ON runs (batch_id) WHERE batch_id IS NOT NULL AND status IN ('queued', 'running');

-- Batches waiting for their deadline (the sweeper's expiry scan).
CREATE INDEX batches_open_expiry ON batches (expires_at) WHERE status IN ('in_progress', 'cancelling');

-- The per-user limit on unfinished chat runs counts only chat runs; without this index that
-- count would read every queued batch run of every user.
CREATE INDEX runs_user_active_chat ON runs (user_id) WHERE batch_id IS NULL AND status IN ('queued', 'running');
-- The sweeper's scan of chat runs left queued, which must not read queued batch runs.
CREATE INDEX runs_chat_queued ON runs (queued_at) WHERE batch_id IS NULL AND status = 'queued';
