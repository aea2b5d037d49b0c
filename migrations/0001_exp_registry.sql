-- exp_registry: the SQL mirror of everything ep-operator does.
-- Kubernetes holds desired state; these tables are a mirror people query with plain SQL.
-- Every statement is idempotent so a replay (or a hand-run) is harmless.

CREATE SCHEMA IF NOT EXISTS exp_registry;

-- One row per experiment (namespace, name). `status` keeps the hand-run pipeline's vocabulary.
CREATE TABLE IF NOT EXISTS exp_registry.experiments (
    id              bigserial PRIMARY KEY,
    namespace       text NOT NULL,
    name            text NOT NULL,
    uid             text,
    status          text NOT NULL DEFAULT 'READY'
                    CHECK (status IN ('READY', 'RUNNING', 'NEEDS_RERUN', 'COMPLETED', 'FAILED', 'FAILED_STATUS_DIVERGENCE')),
    phase           text,
    worker_id       text,
    current_run_id  text,
    attempts        integer NOT NULL DEFAULT 0,
    gpu             text,
    result_f1       double precision,
    result_auc      double precision,
    cost_usd        double precision,
    started_at      timestamptz,
    finished_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    extra           jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (namespace, name)
);
CREATE INDEX IF NOT EXISTS experiments_name_idx ON exp_registry.experiments (name);
CREATE INDEX IF NOT EXISTS experiments_status_idx ON exp_registry.experiments (status);

-- One row per attempt; run_id is unique across namespaces and attempts.
-- fencing_token only grows: a writer holding an older token is refused (split-brain gate).
CREATE TABLE IF NOT EXISTS exp_registry.attempts (
    run_id            text PRIMARY KEY,
    experiment_id     bigint NOT NULL REFERENCES exp_registry.experiments (id) ON DELETE CASCADE,
    attempt           integer NOT NULL CHECK (attempt >= 1),
    fencing_token     bigint NOT NULL,
    status            text NOT NULL CHECK (status IN ('CLAIMED', 'RUNNING', 'DRAINING', 'SUCCEEDED', 'FAILED', 'STOPPED')),
    order_name        text,
    worker_id         text,
    pod_id            text,
    pid               integer,
    gpu_id            text,
    lease_expires_at  timestamptz,
    exit_code         integer,
    reason            text,
    result_f1         double precision,
    result_auc        double precision,
    receipt           text,
    cost_usd          double precision,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    extra             jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (experiment_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_worker_idx ON exp_registry.attempts (worker_id);

-- One row per RunPodOrder.
CREATE TABLE IF NOT EXISTS exp_registry.orders (
    id                bigserial PRIMARY KEY,
    namespace         text NOT NULL,
    name              text NOT NULL,
    uid               text,
    experiment_id     bigint REFERENCES exp_registry.experiments (id) ON DELETE SET NULL,
    run_id            text,
    attempt           integer,
    policy            text NOT NULL,
    worker_id         text NOT NULL,
    provider          text NOT NULL,
    phase             text NOT NULL,
    reason            text,
    approved          boolean NOT NULL DEFAULT false,
    pod_id            text,
    gpu_type_id       text,
    gpu_display_name  text,
    data_center       text,
    cost_per_hr       double precision,
    accrued_usd       double precision,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz,
    extra             jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (namespace, name)
);
CREATE INDEX IF NOT EXISTS orders_pod_idx ON exp_registry.orders (pod_id);
CREATE INDEX IF NOT EXISTS orders_phase_idx ON exp_registry.orders (phase);

-- Latest heartbeat per worker.
CREATE TABLE IF NOT EXISTS exp_registry.worker_heartbeats (
    worker_id      text PRIMARY KEY,
    last_seen      timestamptz NOT NULL,
    running_jobs   integer NOT NULL DEFAULT 0,
    run_id         text,
    pod_id         text,
    seq            bigint,
    pid            integer,
    gpu_ids        text,
    fencing_token  bigint,
    extra          jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- One row per (worker, run): when a worker served a run and how that ended.
CREATE TABLE IF NOT EXISTS exp_registry.worker_sessions (
    id          bigserial PRIMARY KEY,
    worker_id   text NOT NULL,
    run_id      text NOT NULL,
    pod_id      text,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    end_reason  text,
    extra       jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (worker_id, run_id)
);

-- Every RunPod pod the account was seen holding, owned or not.
CREATE TABLE IF NOT EXISTS exp_registry.provider_instances (
    pod_id          text PRIMARY KEY,
    provider        text NOT NULL,
    pod_name        text,
    owner_uid       text,
    run_id          text,
    desired_status  text,
    gpu_type_id     text,
    data_center     text,
    cost_per_hr     double precision,
    accrued_usd     double precision,
    orphan          boolean NOT NULL DEFAULT false,
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    gone_at         timestamptz,
    extra           jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS provider_instances_run_idx ON exp_registry.provider_instances (run_id);

-- Progress reported by the training script, one row per step.
CREATE TABLE IF NOT EXISTS exp_registry.progress (
    run_id       text NOT NULL REFERENCES exp_registry.attempts (run_id) ON DELETE CASCADE,
    step         bigint NOT NULL,
    total        bigint,
    metrics      jsonb NOT NULL DEFAULT '{}'::jsonb,
    reported_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, step)
);

-- Every distinct settings file the operator applied, by content hash.
CREATE TABLE IF NOT EXISTS exp_registry.settings (
    sha256            text PRIMARY KEY,
    body              jsonb NOT NULL,
    first_applied_at  timestamptz NOT NULL,
    last_applied_at   timestamptz NOT NULL
);

-- Append-only log of phase changes of every object. The unique key makes replays harmless.
CREATE TABLE IF NOT EXISTS exp_registry.phase_log (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    namespace   text NOT NULL,
    name        text NOT NULL,
    uid         text NOT NULL,
    from_phase  text,
    to_phase    text NOT NULL,
    reason      text,
    message     text,
    at          timestamptz NOT NULL,
    UNIQUE (uid, to_phase, at)
);
CREATE INDEX IF NOT EXISTS phase_log_object_idx ON exp_registry.phase_log (namespace, name);

CREATE OR REPLACE FUNCTION exp_registry.phase_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'exp_registry.phase_log is append-only (% refused)', TG_OP;
END
$$;
DROP TRIGGER IF EXISTS phase_log_append_only ON exp_registry.phase_log;
CREATE TRIGGER phase_log_append_only BEFORE UPDATE OR DELETE ON exp_registry.phase_log
    FOR EACH ROW EXECUTE FUNCTION exp_registry.phase_log_append_only();
