-- The highest event seq a run's running attempt has published, refreshed with its heartbeat. A
-- worker that takes the run over starts its seqs above it, even when Redis lost the run's
-- counter meanwhile, so a resuming client never sees a seq reused.
ALTER TABLE runs ADD COLUMN seq_floor BIGINT NOT NULL DEFAULT 0 CHECK (seq_floor >= 0);

-- The per-user limit on unfinished runs counts them at every accepted turn. The index on
-- (status, queued_at) made that count visit every unfinished run of every user, plus the dead
-- entries that finished runs leave behind until vacuum.
CREATE INDEX runs_user_active ON runs (user_id) WHERE status IN ('queued', 'running');
