-- Per-run heartbeats live in attempts (worker_heartbeats keeps one row per worker): the newest
-- heartbeat's time and sequence of each run. And what the operator repaired to bind an attempt (for
-- example a stale binding cleared and the order re-bound to the current attempt), so the repair can
-- be queried beside the attempt it served.
ALTER TABLE exp_registry.attempts ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
ALTER TABLE exp_registry.attempts ADD COLUMN IF NOT EXISTS heartbeat_seq bigint;
ALTER TABLE exp_registry.attempts ADD COLUMN IF NOT EXISTS reconcile_action text;
