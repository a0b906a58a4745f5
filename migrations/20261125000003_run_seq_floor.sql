-- The highest event seq a run's running attempt has published, refreshed with its heartbeat. A
-- worker that takes the run over starts its seqs above it, even when Redis lost the run's
-- counter meanwhile, so a resuming client never sees a seq reused.
ALTER TABLE runs ADD COLUMN seq_floor BIGINT NOT NULL DEFAULT 0 CHECK (seq_floor >= 0);

