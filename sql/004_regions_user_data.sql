-- Personal data of one user, for data-protection export and erasure.
--
-- Personal data is every row of a table with a `user_id` column (assignments, conversions, and
-- whatever later migrations add, e.g. embeddings), plus conversions of the user's assignments
-- (their user_id may be NULL) and audit entries whose target names the user. Aggregate tables
-- (segment_variant_state, traffic_stats, ...) hold no user ids and are left alone.

CREATE FUNCTION user_data_tables() RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT c.table_name::text
    FROM information_schema.columns c
    JOIN information_schema.tables t
      ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema()
      AND c.column_name = 'user_id'
      AND t.table_type = 'BASE TABLE'
    ORDER BY 1
$$;

-- Every row held on the user, as (table, row as jsonb).
CREATE FUNCTION export_user_rows(p_user_id text)
RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tbl text;
BEGIN
    FOR tbl IN SELECT user_data_tables() LOOP
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, to_jsonb(t) FROM %I t WHERE t.user_id = $1', tbl, tbl
        ) USING p_user_id;
    END LOOP;
    RETURN QUERY
        SELECT 'conversions'::text, to_jsonb(c) FROM conversions c
        WHERE c.user_id IS DISTINCT FROM p_user_id
          AND c.assignment_id IN (SELECT a.id FROM assignments a WHERE a.user_id = p_user_id);
    RETURN QUERY
        SELECT 'audit_log'::text, to_jsonb(l) FROM audit_log l
        WHERE l.target = 'user:' || p_user_id ORDER BY l.id;
END
$$;

-- Delete every row held on the user and rename the audit entries that name the user to
-- p_audit_target; return the number of rows touched per table.
CREATE FUNCTION erase_user_rows(p_user_id text, p_audit_target text)
RETURNS TABLE (table_name text, removed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    n bigint;
BEGIN
    DELETE FROM conversions c
    WHERE c.assignment_id IN (SELECT a.id FROM assignments a WHERE a.user_id = p_user_id)
      AND c.user_id IS DISTINCT FROM p_user_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    table_name := 'conversions (by assignment)';
    removed := n;
    RETURN NEXT;
    FOR tbl IN SELECT user_data_tables() LOOP
        EXECUTE format('DELETE FROM %I t WHERE t.user_id = $1', tbl) USING p_user_id;
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

-- Cross-region sync: the latest totals each other region published, per counter. Only
-- aggregates cross regions (no user ids). A source's totals only grow, so storing the latest
-- (GREATEST) makes a repeated or interrupted sync harmless: it never double-counts.
CREATE TABLE region_remote_counts (
    source_region  text     NOT NULL,
    experiment_key text     NOT NULL,
    segment_hash   bigint   NOT NULL,
    variant        smallint NOT NULL CHECK (variant >= 0),
    allocations    bigint   NOT NULL DEFAULT 0,
    conversions    bigint   NOT NULL DEFAULT 0,
    value_sum      double precision NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_region, experiment_key, segment_hash, variant)
);

-- Global counts as this region knows them: its own totals plus every other region's latest.
CREATE VIEW v_global_segment_state AS
SELECT experiment_key, segment_hash, variant,
       sum(allocations)::bigint AS allocations,
       sum(conversions)::bigint AS conversions,
       sum(value_sum) AS value_sum
FROM (
    SELECT e.key AS experiment_key, s.segment_hash, s.variant, s.allocations, s.conversions,
           s.value_sum
    FROM segment_variant_state s JOIN experiments e ON e.id = s.experiment_id
    UNION ALL
    SELECT experiment_key, segment_hash, variant, allocations, conversions, value_sum
    FROM region_remote_counts
) AS both_sources
GROUP BY experiment_key, segment_hash, variant;
