-- Approval and spend. An experiment's approval (who, when the operator first saw it, and the
-- envelope it covers) and each order's approver and budget reservation; and the spend ledger, one
-- row per order and UTC day: what the order reserved against its namespace's budget and what it
-- actually spent that day. Rows outlive their orders and experiments, so
--   SELECT sum(spent_usd) FROM exp_registry.spend_ledger
--   WHERE namespace = 'fraud-detect' AND day >= '2026-11-01' AND day < '2026-12-01';
-- answers what a namespace spent in November.
ALTER TABLE exp_registry.experiments ADD COLUMN IF NOT EXISTS approved_by text;
ALTER TABLE exp_registry.experiments ADD COLUMN IF NOT EXISTS approved_at timestamptz;
ALTER TABLE exp_registry.experiments ADD COLUMN IF NOT EXISTS approval_envelope jsonb;
ALTER TABLE exp_registry.orders ADD COLUMN IF NOT EXISTS approved_by text;
ALTER TABLE exp_registry.orders ADD COLUMN IF NOT EXISTS reserved_usd double precision;

CREATE TABLE IF NOT EXISTS exp_registry.spend_ledger (
    order_uid     text             NOT NULL,
    day           date             NOT NULL,
    namespace     text             NOT NULL,
    order_name    text             NOT NULL,
    experiment    text,
    reserved_usd  double precision NOT NULL DEFAULT 0,
    spent_usd     double precision NOT NULL DEFAULT 0,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (order_uid, day)
);
CREATE INDEX IF NOT EXISTS spend_ledger_namespace_day ON exp_registry.spend_ledger (namespace, day);
