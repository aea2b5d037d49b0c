-- A read-only role for the people who watch (the pipeline's health viewer): its members may read
-- every registry table, now and later, and write nothing. Grant it with
--   CREATE ROLE finch LOGIN IN ROLE exp_registry_reader;
-- Where the operator's database user may not create roles, the role is left out with a notice
-- naming what an administrator runs instead; nothing else depends on it.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'exp_registry_reader') THEN
    BEGIN
      CREATE ROLE exp_registry_reader NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      NULL; -- another database of this server made it at the same moment
    END;
  END IF;
  GRANT USAGE ON SCHEMA exp_registry TO exp_registry_reader;
  GRANT SELECT ON ALL TABLES IN SCHEMA exp_registry TO exp_registry_reader;
  ALTER DEFAULT PRIVILEGES IN SCHEMA exp_registry GRANT SELECT ON TABLES TO exp_registry_reader;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'exp_registry_reader not set up (%): an administrator runs CREATE ROLE exp_registry_reader NOLOGIN; GRANT USAGE ON SCHEMA exp_registry TO exp_registry_reader; GRANT SELECT ON ALL TABLES IN SCHEMA exp_registry TO exp_registry_reader', SQLERRM;
END
$$;
