-- Segment functions, performance views and the analytics materialized view.

-- Hash of the global segment: xxh3-64 (seed 0) of the empty key, 0x2D06800538D394C2. It is a
-- fixed point of the canonical hashing, checked against the Python hash in the tests.
CREATE FUNCTION global_segment_hash() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 3244421341483603138::bigint $$;

-- Register a segment if it is new and return its hash. Raises if the hash is already taken by a
-- different key (a hash collision or a caller bug: counters would be mixed up otherwise).
CREATE FUNCTION get_or_create_segment(
    p_experiment_id bigint,
    p_segment_hash  bigint,
    p_segment_key   text,
    p_level         integer,
    p_parent_hash   bigint,
    p_dimensions    jsonb DEFAULT '{}'::jsonb
) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    existing_key text;
BEGIN
    INSERT INTO context_segments AS c
        (experiment_id, segment_hash, segment_key, level, parent_hash, dimensions)
    VALUES (p_experiment_id, p_segment_hash, p_segment_key, p_level, p_parent_hash,
            COALESCE(p_dimensions, '{}'::jsonb))
    ON CONFLICT (experiment_id, segment_hash) DO NOTHING;

    SELECT c.segment_key INTO existing_key
    FROM context_segments AS c
    WHERE c.experiment_id = p_experiment_id AND c.segment_hash = p_segment_hash;

    IF existing_key IS DISTINCT FROM p_segment_key THEN
        RAISE EXCEPTION 'segment hash % of experiment % belongs to key %, not %',
            p_segment_hash, p_experiment_id, quote_literal(existing_key),
            quote_literal(p_segment_key)
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN p_segment_hash;
END
$$;

-- Add deltas to one posterior counter row (created on first use).
CREATE FUNCTION update_segment_stats(
    p_experiment_id bigint,
    p_segment_hash  bigint,
    p_variant       integer,
    p_allocations   bigint,
    p_conversions   bigint,
    p_value_sum     double precision DEFAULT 0
) RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO segment_variant_state AS s
        (experiment_id, segment_hash, variant, allocations, conversions, value_sum, updated_at)
    VALUES (p_experiment_id, p_segment_hash, p_variant, p_allocations, p_conversions,
            p_value_sum, now())
    ON CONFLICT (experiment_id, segment_hash, variant) DO UPDATE
    SET allocations = s.allocations + EXCLUDED.allocations,
        conversions = s.conversions + EXCLUDED.conversions,
        value_sum   = s.value_sum + EXCLUDED.value_sum,
        updated_at  = EXCLUDED.updated_at;
$$;

-- Parent links of an experiment's segments: its current (highest-version) tree when one has been
-- built, otherwise the segments recorded in context_segments.
CREATE FUNCTION segment_links(p_experiment_id bigint)
RETURNS TABLE (segment_hash bigint, parent_hash bigint, segment_key text, level smallint,
               pruned boolean)
LANGUAGE sql STABLE
AS $$
    WITH tree AS (
        SELECT max(h.version) AS version
        FROM segment_hierarchy AS h
        WHERE h.experiment_id = p_experiment_id
    )
    SELECT h.node_hash, h.parent_hash, h.segment_key, h.level, h.pruned
    FROM segment_hierarchy AS h
    JOIN tree ON h.version = tree.version
    WHERE h.experiment_id = p_experiment_id
    UNION ALL
    SELECT c.segment_hash, c.parent_hash, c.segment_key, c.level, false
    FROM context_segments AS c
    CROSS JOIN tree
    WHERE c.experiment_id = p_experiment_id AND tree.version IS NULL
$$;

-- Direct children of a segment (pruned tree nodes excluded), ordered by key.
CREATE FUNCTION get_segment_children(p_experiment_id bigint, p_segment_hash bigint)
RETURNS TABLE (segment_hash bigint, segment_key text, level smallint)
LANGUAGE sql STABLE
AS $$
    SELECT l.segment_hash, l.segment_key, l.level
    FROM segment_links(p_experiment_id) AS l
    WHERE l.parent_hash = p_segment_hash AND NOT l.pruned
    ORDER BY l.segment_key
$$;

-- Ancestors of a segment, nearest first: depth 1 is the parent, the root (global) comes last.
-- The segment itself is not included; an unknown segment has no ancestors.
CREATE FUNCTION get_segment_ancestors(p_experiment_id bigint, p_segment_hash bigint)
RETURNS TABLE (depth integer, segment_hash bigint, segment_key text, level smallint)
LANGUAGE sql STABLE
AS $$
    WITH RECURSIVE links AS (
        SELECT * FROM segment_links(p_experiment_id)
    ), up (depth, segment_hash, parent_hash, segment_key, level) AS (
        SELECT 0, l.segment_hash, l.parent_hash, l.segment_key, l.level
        FROM links AS l
        WHERE l.segment_hash = p_segment_hash
        UNION ALL
        SELECT up.depth + 1, l.segment_hash, l.parent_hash, l.segment_key, l.level
        FROM up
        JOIN links AS l ON l.segment_hash = up.parent_hash
        WHERE up.depth < 64  -- guards against a corrupt cycle
    )
    SELECT up.depth, up.segment_hash, up.segment_key, up.level
    FROM up
    WHERE up.depth > 0
    ORDER BY up.depth
$$;

-- Counters and conversion rate per (experiment, segment, variant). Segments absent from
-- context_segments show a NULL key, except the global segment which is always known.
CREATE VIEW v_segment_performance AS
SELECT s.experiment_id,
       e.key AS experiment_key,
       s.segment_hash,
       COALESCE(c.segment_key,
                CASE WHEN s.segment_hash = global_segment_hash() THEN '' END) AS segment_key,
       COALESCE(c.level,
                CASE WHEN s.segment_hash = global_segment_hash() THEN 0::smallint END) AS level,
       s.variant,
       v.key AS variant_key,
       s.allocations,
       s.conversions,
       s.value_sum,
       s.conversions::double precision / NULLIF(s.allocations, 0) AS conversion_rate,
       s.value_sum / NULLIF(s.allocations, 0) AS value_per_allocation,
       s.updated_at
FROM segment_variant_state AS s
JOIN experiments AS e ON e.id = s.experiment_id
LEFT JOIN variants AS v ON v.experiment_id = s.experiment_id AND v.index = s.variant
LEFT JOIN context_segments AS c
       ON c.experiment_id = s.experiment_id AND c.segment_hash = s.segment_hash;

-- Each non-global segment's rate against the global segment's rate for the same variant.
-- lift_ratio = conversion_rate / global_conversion_rate (1.0: no difference; NULL when undefined).
CREATE VIEW v_segment_lift AS
SELECT p.experiment_id,
       p.experiment_key,
       p.segment_hash,
       p.segment_key,
       p.level,
       p.variant,
       p.variant_key,
       p.allocations,
       p.conversions,
       p.conversion_rate,
       g.allocations AS global_allocations,
       g.conversions AS global_conversions,
       g.conversions::double precision / NULLIF(g.allocations, 0) AS global_conversion_rate,
       p.conversion_rate
           / NULLIF(g.conversions::double precision / NULLIF(g.allocations, 0), 0) AS lift_ratio
FROM v_segment_performance AS p
LEFT JOIN segment_variant_state AS g
       ON g.experiment_id = p.experiment_id
      AND g.segment_hash = global_segment_hash()
      AND g.variant = p.variant
WHERE p.segment_hash <> global_segment_hash();

-- Snapshot for dashboards and the analyzer, refreshed CONCURRENTLY (hence the unique index).
-- One row per (experiment, segment, variant), the global segment included (lift 1).
CREATE MATERIALIZED VIEW mv_segment_analytics AS
SELECT p.experiment_id,
       p.experiment_key,
       p.segment_hash,
       p.segment_key,
       p.level,
       p.variant,
       p.variant_key,
       p.allocations,
       p.conversions,
       p.value_sum,
       p.conversion_rate,
       sum(p.allocations) OVER segment AS segment_allocations,
       sum(p.conversions) OVER segment AS segment_conversions,
       p.allocations::double precision
           / NULLIF(sum(p.allocations) OVER segment, 0) AS allocation_share,
       g.conversions::double precision / NULLIF(g.allocations, 0) AS global_conversion_rate,
       p.conversion_rate
           / NULLIF(g.conversions::double precision / NULLIF(g.allocations, 0), 0) AS lift_ratio,
       now() AS refreshed_at
FROM v_segment_performance AS p
LEFT JOIN segment_variant_state AS g
       ON g.experiment_id = p.experiment_id
      AND g.segment_hash = global_segment_hash()
      AND g.variant = p.variant
WINDOW segment AS (PARTITION BY p.experiment_id, p.segment_hash)
WITH DATA;

CREATE UNIQUE INDEX mv_segment_analytics_key_idx
    ON mv_segment_analytics (experiment_id, segment_hash, variant);
CREATE INDEX mv_segment_analytics_experiment_idx
    ON mv_segment_analytics (experiment_key, level);
