-- Assignments lose their index on user_id alone. Every write-behind flush adds each assignment
-- to it, and user ids come in no order, so each row lands on a random page of an index that
-- outgrows memory; only data protection (export and erasure of one user) read it. On the
-- embedded server, COPYs of 200,000 assignments with random user ids into a table growing to
-- 2,000,000 rows went from 74,000 down to 35,000 rows/s with the index and from 96,000 down to
-- 67,000 without it (bench/RESULTS.md, "Batch fast path and hot-path log", item 21).
--
-- A user's assignments are now found through (experiment_id, user_id, created_at), one lookup
-- per experiment that has assignments: those experiments are read off the
-- (experiment_id, created_at) index one step each, so deleted experiments' rows (008 dropped
-- the foreign key) are still found.
DROP INDEX IF EXISTS assignments_user_idx;

-- The experiments that have assignments (a skip scan: one index descent per experiment).
CREATE FUNCTION assignment_experiment_ids() RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE e(id) AS (
        (SELECT experiment_id FROM assignments ORDER BY experiment_id LIMIT 1)
        UNION ALL
        SELECT (SELECT a.experiment_id FROM assignments a
                WHERE a.experiment_id > e.id ORDER BY a.experiment_id LIMIT 1)
        FROM e WHERE e.id IS NOT NULL
    )
    SELECT coalesce(array_agg(id), '{}') FROM e WHERE id IS NOT NULL
$$;

-- The condition that picks user $1's rows of a user-data table as `t`, by an index.
CREATE FUNCTION user_rows_condition(tbl text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN tbl = 'assignments'
        THEN 't.experiment_id = ANY (assignment_experiment_ids()) AND t.user_id = $1'
        ELSE 't.user_id = $1'
    END
$$;

-- The ids of user $1's assignments.
CREATE FUNCTION user_assignment_ids(p_user_id text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT a.id FROM assignments a
    WHERE a.experiment_id = ANY (assignment_experiment_ids()) AND a.user_id = p_user_id
$$;

CREATE OR REPLACE FUNCTION export_user_rows(p_user_id text)
RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tbl text;
BEGIN
    FOR tbl IN SELECT user_data_tables() LOOP
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, to_jsonb(t) FROM %I t WHERE %s', tbl, tbl, user_rows_condition(tbl)
        ) USING p_user_id;
    END LOOP;
    RETURN QUERY
        SELECT 'conversions'::text, to_jsonb(c) FROM conversions c
        WHERE c.user_id IS DISTINCT FROM p_user_id
          AND c.assignment_id IN (SELECT user_assignment_ids(p_user_id));
    RETURN QUERY
        SELECT 'audit_log'::text, to_jsonb(l) FROM audit_log l
        WHERE l.target = 'user:' || p_user_id ORDER BY l.id;
END
$$;

CREATE OR REPLACE FUNCTION erase_user_rows(p_user_id text, p_audit_target text)
RETURNS TABLE (table_name text, removed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    n bigint;
BEGIN
    DELETE FROM conversions c
    WHERE c.assignment_id IN (SELECT user_assignment_ids(p_user_id))
      AND c.user_id IS DISTINCT FROM p_user_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'conversions (by assignment)';
    removed := n;
    RETURN NEXT;
    FOR tbl IN SELECT user_data_tables() LOOP
        EXECUTE format('DELETE FROM %I t WHERE %s', tbl, user_rows_condition(tbl))
            USING p_user_id;
        GET DIAGNOSTICS n = ROW_COUNT;
        table_name := tbl;
        removed := n;
        RETURN NEXT;
    END LOOP;
    UPDATE audit_log SET target = p_audit_target WHERE target = 'user:' || p_user_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'audit_log (anonymised)';
    removed := n;
    RETURN NEXT;
END
$$;
