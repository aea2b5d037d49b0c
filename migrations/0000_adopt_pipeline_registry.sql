-- Adopts a registry that predates the operator: the hand-run pipeline's own `exp_registry`, whose
-- `experiments` table is keyed by name and whose `worker_heartbeats` is keyed by worker, with only
-- the columns the pipeline's four queries read.
--
-- Version 0 runs before 0001 on a database that has never seen the operator; on one that already
-- ran 0001 it finds every column in place and changes nothing. Every statement is additive and
-- idempotent: columns are added if missing (existing rows keep their values; new columns take their
-- default), indexes are created if missing, nothing is dropped, retyped or rewritten. The operator
-- checks the existing columns' types before any migration runs and refuses to start on a column it
-- would have to convert (see controller/src/registry/schema.rs).

CREATE SCHEMA IF NOT EXISTS exp_registry;

-- experiments: the pipeline's rows keep their name, status, worker and results; they gain an id (for
-- the operator's child tables) and the namespace '' (they were never Kubernetes objects).
DO $$
BEGIN
    IF to_regclass('exp_registry.experiments') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = 'exp_registry' AND table_name = 'experiments' AND column_name = 'id'
    ) THEN
        ALTER TABLE exp_registry.experiments ADD COLUMN id bigserial;
        CREATE UNIQUE INDEX IF NOT EXISTS experiments_id_key ON exp_registry.experiments (id);
    END IF;
END
$$;

ALTER TABLE IF EXISTS exp_registry.experiments
    ADD COLUMN IF NOT EXISTS namespace      text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS name           text,
    ADD COLUMN IF NOT EXISTS uid            text,
    ADD COLUMN IF NOT EXISTS status         text NOT NULL DEFAULT 'READY',
    ADD COLUMN IF NOT EXISTS phase          text,
    ADD COLUMN IF NOT EXISTS worker_id      text,
    ADD COLUMN IF NOT EXISTS current_run_id text,
    ADD COLUMN IF NOT EXISTS attempts       integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS gpu            text,
    ADD COLUMN IF NOT EXISTS result_f1      double precision,
    ADD COLUMN IF NOT EXISTS result_auc     double precision,
    ADD COLUMN IF NOT EXISTS cost_usd       double precision,
    ADD COLUMN IF NOT EXISTS started_at     timestamptz,
    ADD COLUMN IF NOT EXISTS finished_at    timestamptz,
    ADD COLUMN IF NOT EXISTS created_at     timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at     timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS extra          jsonb NOT NULL DEFAULT '{}'::jsonb;

DO $$
BEGIN
    IF to_regclass('exp_registry.experiments') IS NOT NULL THEN
        -- The operator's key. On an operator-made table this is the UNIQUE constraint's own index.
        CREATE UNIQUE INDEX IF NOT EXISTS experiments_namespace_name_key ON exp_registry.experiments (namespace, name);
    END IF;
END
$$;

-- worker_heartbeats: one row per worker stays one row per worker.
ALTER TABLE IF EXISTS exp_registry.worker_heartbeats
    ADD COLUMN IF NOT EXISTS last_seen     timestamptz,
    ADD COLUMN IF NOT EXISTS running_jobs  integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS run_id        text,
    ADD COLUMN IF NOT EXISTS pod_id        text,
    ADD COLUMN IF NOT EXISTS seq           bigint,
    ADD COLUMN IF NOT EXISTS pid           integer,
    ADD COLUMN IF NOT EXISTS gpu_ids       text,
    ADD COLUMN IF NOT EXISTS fencing_token bigint,
    ADD COLUMN IF NOT EXISTS extra         jsonb NOT NULL DEFAULT '{}'::jsonb;

DO $$
BEGIN
    IF to_regclass('exp_registry.worker_heartbeats') IS NOT NULL THEN
        IF NOT EXISTS (
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass('exp_registry.worker_heartbeats') AND i.indisunique
              AND i.indnatts = 1 AND a.attname = 'worker_id'
        ) THEN
            CREATE UNIQUE INDEX worker_heartbeats_worker_id_key ON exp_registry.worker_heartbeats (worker_id);
        END IF;
    END IF;
END
$$;
