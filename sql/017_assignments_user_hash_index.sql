-- A user's assignments are found through a btree on a 64-bit hash of user_id
-- (`hashtextextended(user_id, 0)`) instead of the one on (experiment_id, user_id, created_at).
-- Users come in no order, so every new assignment lands at a random place of that index, which
-- outgrows shared buffers as the table grows (item 71 of bench/RESULTS.md); an entry of the new
-- one holds 8 bytes where the old one's held the experiment, the user id and the time, so it
-- is less than half the size and each new row costs PostgreSQL less (item 76). A btree, not a
-- hash index: a hash index puts every row of one user in one bucket's chain of pages, and each
-- insert walks that chain (one user with many assignments made every insert slower).
--
-- Who reads it: a user's latest assignment in an experiment (the user's rows, then the
-- experiment as a filter: `PostgresStore.get_latest_assignments`), and the rows of one user
-- for export and erasure, now by the user alone, without a step per experiment
-- (`assignment_experiment_ids`, 009, stays for whoever calls it). Each asks for
-- `hashtextextended(user_id, 0) = hashtextextended(<user>, 0) AND user_id = <user>`: the index
-- only serves a condition on its expression.
DROP INDEX IF EXISTS assignments_experiment_user_idx;
CREATE INDEX assignments_user_hash_idx ON assignments (hashtextextended(user_id, 0));

CREATE OR REPLACE FUNCTION user_rows_condition(tbl text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN tbl = 'assignments'
        THEN 'hashtextextended(t.user_id, 0) = hashtextextended($1, 0) AND t.user_id = $1'
        ELSE 't.user_id = $1'
    END
$$;

CREATE OR REPLACE FUNCTION user_assignment_ids(p_user_id text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT a.id FROM assignments a
    WHERE hashtextextended(a.user_id, 0) = hashtextextended(p_user_id, 0)
      AND a.user_id = p_user_id
$$;
