-- The two upserts that add to the counters and to the day's traffic, kept once. A write-behind
-- flush (allocations) and a conversion group commit (`record_conversions`, migration 013)
-- both add to them, and each spelled out the same ON CONFLICT arithmetic: a change to how
-- counters are kept had to be made in both places. Both now call these.
--
-- plpgsql, not sql: plpgsql keeps each statement's plan for the session, a SQL function plans
-- its INSERT again on every call.
--
-- Each locks its rows in one order (experiments ascending; counters by experiment, segment,
-- variant), and a caller adds traffic before counters: a flush and a conversion commit then
-- never wait on each other in opposite orders.

-- Add (visitors, allocations, conversions) to each experiment's traffic of `p_day`; one row
-- per experiment (ON CONFLICT may touch a row once per statement).
CREATE FUNCTION add_traffic(
    p_experiment_ids bigint[], p_day date, p_visitors bigint[], p_allocations bigint[],
    p_conversions bigint[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO traffic_stats AS t (experiment_id, day, visitors, allocations, conversions)
    SELECT n.e, p_day, n.v, n.a, n.c
    FROM unnest(p_experiment_ids, p_visitors, p_allocations, p_conversions) AS n(e, v, a, c)
    ORDER BY n.e
    ON CONFLICT (experiment_id, day) DO UPDATE
    SET visitors = t.visitors + EXCLUDED.visitors,
        allocations = t.allocations + EXCLUDED.allocations,
        conversions = t.conversions + EXCLUDED.conversions;
END
$$;

-- Add (allocations, conversions, value sum) deltas to the counters; repeated keys are summed
-- first.
CREATE FUNCTION add_counts(
    p_experiment_ids bigint[], p_segment_hashes bigint[], p_variants smallint[],
    p_allocations bigint[], p_conversions bigint[], p_values float8[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_variant_state AS s
        (experiment_id, segment_hash, variant, allocations, conversions, value_sum, updated_at)
    SELECT d.experiment_id, d.segment_hash, d.variant,
           sum(d.allocations), sum(d.conversions), sum(d.value_sum), now()
    FROM unnest(p_experiment_ids, p_segment_hashes, p_variants, p_allocations, p_conversions,
                p_values) AS d(experiment_id, segment_hash, variant, allocations, conversions,
                               value_sum)
    GROUP BY d.experiment_id, d.segment_hash, d.variant
    ORDER BY d.experiment_id, d.segment_hash, d.variant
    ON CONFLICT (experiment_id, segment_hash, variant) DO UPDATE
    SET allocations = s.allocations + EXCLUDED.allocations,
        conversions = s.conversions + EXCLUDED.conversions,
        value_sum   = s.value_sum + EXCLUDED.value_sum,
        updated_at  = EXCLUDED.updated_at;
END
$$;

-- Migration 013's function, its two upserts now the ones above (the same rows, the same order).
CREATE OR REPLACE FUNCTION record_conversions(
    p_assignment_ids text[], p_experiment_ids bigint[], p_user_ids text[], p_variants smallint[],
    p_segment_keys text[], p_values float8[], p_idempotency_keys text[], p_made timestamptz[],
    p_day date, p_path_rows integer[], p_path_hashes bigint[]
) RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    new_rows integer[];
    t_experiments bigint[];
    zeros bigint[];
    t_conversions bigint[];
BEGIN
    WITH c AS (
        SELECT * FROM unnest(p_assignment_ids, p_experiment_ids, p_user_ids, p_variants,
                             p_segment_keys, p_values, p_idempotency_keys, p_made)
            WITH ORDINALITY AS c(assignment_id, experiment_id, user_id, variant, segment_key,
                                 value, idempotency_key, created_at, i)
    ), ins AS (
        INSERT INTO conversions AS t (assignment_id, experiment_id, user_id, variant,
                                      segment_key, value, idempotency_key, created_at)
        SELECT c.assignment_id, c.experiment_id, c.user_id, c.variant, c.segment_key, c.value,
               c.idempotency_key, COALESCE(c.created_at, now())
        FROM c ORDER BY c.assignment_id, c.idempotency_key
        ON CONFLICT (assignment_id, idempotency_key) DO NOTHING
        RETURNING t.assignment_id, t.idempotency_key
    )
    SELECT array_agg(c.i::integer) INTO new_rows
    FROM ins JOIN c ON c.assignment_id = ins.assignment_id
                   AND c.idempotency_key = ins.idempotency_key;
    IF new_rows IS NULL THEN
        RETURN '{}';
    END IF;
    -- The new conversions per experiment, then one counter delta per path level of each.
    SELECT array_agg(e), array_agg(0::bigint), array_agg(n) INTO t_experiments, zeros, t_conversions
    FROM (SELECT p_experiment_ids[r] AS e, count(*) AS n FROM unnest(new_rows) AS r
          GROUP BY 1) AS per_experiment;
    PERFORM add_traffic(t_experiments, p_day, zeros, zeros, t_conversions);
    PERFORM add_counts(array_agg(p_experiment_ids[p.r]), array_agg(p.h),
                       array_agg(p_variants[p.r]), array_agg(0::bigint), array_agg(1::bigint),
                       array_agg(p_values[p.r]))
    FROM unnest(p_path_rows, p_path_hashes) AS p(r, h)
    WHERE p.r = ANY (new_rows);
    RETURN new_rows;
END
$$;
