-- What the operator repaired to bind an attempt (for example a stale binding cleared and the order
-- re-bound to the current attempt), so the repair can be queried beside the attempt it served.
ALTER TABLE exp_registry.attempts ADD COLUMN IF NOT EXISTS reconcile_action text;
