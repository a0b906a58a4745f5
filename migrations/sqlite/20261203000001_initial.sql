-- Conveyor's schema for the embedded mode (`conveyor dev`): the Postgres schema in
-- `migrations/*.sql` (all of it, as of its third migration) in SQLite's words.
--
-- Differences, each forced by SQLite: JSON columns are TEXT checked with `json_valid`;
-- timestamps are ISO-8601 UTC text with milliseconds (`strftime('%Y-%m-%dT%H:%M:%fZ')`, written
-- by SQL only, so text order is time order); identity columns are INTEGER rowids, and
-- `messages` keys on its `seq` rowid with `id` unique beside it.

CREATE TABLE conversations (
    id          TEXT PRIMARY KEY CHECK (id LIKE 'conv\_%' ESCAPE '\'),
    user_id     TEXT NOT NULL,
    title       TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC);

CREATE TABLE batches (
    id                  TEXT PRIMARY KEY CHECK (id LIKE 'batch\_%' ESCAPE '\'),
    user_id             TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'completed', 'failed', 'cancelling', 'cancelled', 'expired')),
    metadata            TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    completion_window   TEXT,
    total               INTEGER NOT NULL DEFAULT 0 CHECK (total >= 0),
    created_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at         TEXT,
    expires_at          TEXT,
    cancel_requested_at TEXT
);
CREATE INDEX batches_user_created ON batches (user_id, created_at DESC, id DESC);
CREATE INDEX batches_open_expiry ON batches (expires_at) WHERE status IN ('in_progress', 'cancelling');

CREATE TABLE runs (
    id               TEXT PRIMARY KEY CHECK (id LIKE 'run\_%' ESCAPE '\'),
    user_id          TEXT NOT NULL,
    conversation_id  TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    idempotency_key  TEXT,
    request_hash     TEXT,
    batch_id         TEXT REFERENCES batches (id) ON DELETE CASCADE,
    custom_id        TEXT,
    error            TEXT CHECK (error IS NULL OR json_valid(error)),
    worker           TEXT,
    heartbeat_at     TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    queued_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at       TEXT,
    finished_at      TEXT,
    seq_floor        INTEGER NOT NULL DEFAULT 0 CHECK (seq_floor >= 0),
    CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);
CREATE UNIQUE INDEX runs_user_idempotency_key ON runs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_conversation_active ON runs (conversation_id, queued_at, id) WHERE status IN ('queued', 'running');
CREATE INDEX runs_active_by_status ON runs (status, queued_at) WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX runs_batch_custom_id ON runs (batch_id, custom_id) WHERE batch_id IS NOT NULL;
CREATE INDEX runs_batch_active ON runs (batch_id) WHERE batch_id IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX runs_user_active_chat ON runs (user_id) WHERE batch_id IS NULL AND status IN ('queued', 'running');
CREATE INDEX runs_chat_queued ON runs (queued_at) WHERE batch_id IS NULL AND status = 'queued';

CREATE TABLE messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE CHECK (id LIKE 'msg\_%' ESCAPE '\'),
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    run_id          TEXT REFERENCES runs (id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content         TEXT NOT NULL DEFAULT '',
    tool_calls      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tool_calls)),
    tool_call_id    TEXT,
    status          TEXT CHECK (status IN ('completed', 'cancelled')),
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK ((role = 'tool') = (tool_call_id IS NOT NULL))
);
CREATE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE INDEX messages_run ON messages (run_id);

CREATE TABLE run_steps (
    run_id        TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL CHECK (step >= 0),
    tool_call_id  TEXT NOT NULL,
    name          TEXT NOT NULL,
    arguments     TEXT NOT NULL CHECK (json_valid(arguments)),
    ok            INTEGER NOT NULL CHECK (ok IN (0, 1)),
    result        TEXT NOT NULL CHECK (json_valid(result)),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, step)
);

CREATE TABLE run_events (
    run_id  TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL CHECK (seq >= 1),
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL CHECK (json_valid(data)),
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE tasks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     TEXT NOT NULL,
    title       TEXT NOT NULL CHECK (length(trim(title)) BETWEEN 1 AND 500),
    description TEXT CHECK (description IS NULL OR length(description) <= 5000),
    priority    TEXT NOT NULL DEFAULT 'medium' CHECK (priority IN ('low', 'medium', 'high')),
    completed   INTEGER NOT NULL DEFAULT 0 CHECK (completed IN (0, 1)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX tasks_user ON tasks (user_id, id);

CREATE TABLE tool_idempotency (
    user_id     TEXT NOT NULL,
    key         TEXT NOT NULL,
    tool        TEXT NOT NULL,
    result      TEXT NOT NULL CHECK (json_valid(result)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (user_id, key)
);

-- The embedded mode's replay buffer: every event of a run, text deltas included, so that a
-- client resumes gap-free across a restart of the process. Rows of a finished run are
-- deleted a while after it ends (`expires_at`); `run_events` keeps the durable ones.
CREATE TABLE event_buffer (
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 1),
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL,
    expires_at  TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX event_buffer_expiry ON event_buffer (expires_at) WHERE expires_at IS NOT NULL;
