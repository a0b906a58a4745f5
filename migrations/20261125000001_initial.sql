-- Conveyor's schema. Every row that belongs to a person carries `user_id`, and every query the
-- services run filters on it: isolation is a property of the data layer, not of the callers.

CREATE TABLE conversations (
    id          TEXT PRIMARY KEY CHECK (id LIKE 'conv\_%'),
    user_id     TEXT NOT NULL,
    title       TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The conversation list: newest-updated first, keyset-paginated on (updated_at, id).
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC);

CREATE TABLE batches (
    id                TEXT PRIMARY KEY CHECK (id LIKE 'batch\_%'),
    user_id           TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'completed', 'failed', 'cancelling', 'cancelled', 'expired')),
    metadata          JSONB,
    completion_window TEXT,
    total             INTEGER NOT NULL DEFAULT 0 CHECK (total >= 0),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at       TIMESTAMPTZ
);
CREATE INDEX batches_user_created ON batches (user_id, created_at DESC, id DESC);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY CHECK (id LIKE 'run\_%'),
    user_id          TEXT NOT NULL,
    conversation_id  TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    attempt          INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Idempotency: the key a client sent and a hash of the request it came with, so that the
    -- same key with another body is refused instead of silently answered with the old run.
    idempotency_key  TEXT,
    request_hash     TEXT,
    batch_id         TEXT REFERENCES batches (id) ON DELETE CASCADE,
    custom_id        TEXT,
    error            JSONB,
    -- The worker that holds the run and when it last said so; the sweeper hands runs whose
    -- worker went silent to another one.
    worker           TEXT,
    heartbeat_at     TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    queued_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);
CREATE UNIQUE INDEX runs_user_idempotency_key ON runs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- "Is this conversation busy?" and "which run comes next?"
CREATE INDEX runs_conversation_active ON runs (conversation_id, queued_at, id) WHERE status IN ('queued', 'running');
-- The sweeper's scan.
CREATE INDEX runs_active_by_status ON runs (status, queued_at) WHERE status IN ('queued', 'running');
CREATE INDEX runs_batch ON runs (batch_id, custom_id) WHERE batch_id IS NOT NULL;

CREATE TABLE messages (
    id             TEXT PRIMARY KEY CHECK (id LIKE 'msg\_%'),
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id        TEXT NOT NULL,
    run_id         TEXT REFERENCES runs (id) ON DELETE CASCADE,
    -- Order of the conversation's history; a database sequence, so it never collides.
    seq            BIGINT GENERATED ALWAYS AS IDENTITY,
    role           TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content        TEXT NOT NULL DEFAULT '',
    tool_calls     JSONB NOT NULL DEFAULT '[]'::jsonb,
    tool_call_id   TEXT,
    status         TEXT CHECK (status IN ('completed', 'cancelled')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((role = 'tool') = (tool_call_id IS NOT NULL))
);
CREATE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE INDEX messages_run ON messages (run_id);

-- The journal of a run's tool calls: a retried attempt reuses a recorded result instead of
-- calling the tool (and repeating its side effect) again.
CREATE TABLE run_steps (
    run_id        TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL CHECK (step >= 0),
    tool_call_id  TEXT NOT NULL,
    name          TEXT NOT NULL,
    arguments     JSONB NOT NULL,
    ok            BOOLEAN NOT NULL,
    result        JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step)
);

-- The durable copy of a run's events (all but text deltas), written with the run's final
-- commit, so that a stream whose Redis replay buffer expired can be rebuilt exactly.
CREATE TABLE run_events (
    run_id  TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL CHECK (seq >= 1),
    kind    TEXT NOT NULL,
    data    JSONB NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE tasks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     TEXT NOT NULL,
    title       TEXT NOT NULL CHECK (char_length(btrim(title)) BETWEEN 1 AND 500),
    description TEXT CHECK (description IS NULL OR char_length(description) <= 5000),
    priority    TEXT NOT NULL DEFAULT 'medium' CHECK (priority IN ('low', 'medium', 'high')),
    completed   BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tasks_user ON tasks (user_id, id);

-- Exactly-once tool effects: a tool call that carries an idempotency key stores its result
-- here in the same transaction as its effect; a repeat answers the stored result.
CREATE TABLE tool_idempotency (
    user_id     TEXT NOT NULL,
    key         TEXT NOT NULL,
    tool        TEXT NOT NULL,
    result      JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
