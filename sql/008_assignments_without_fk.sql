-- Assignments are the write-behind's bulk rows (a 1,000-item batch is 1,000 of them), and their
-- foreign key to experiments was checked row by row: on the embedded server, one write-behind
-- flush of 200,000 rows went in at 35,000-38,000 rows/s with it and 63,000-68,000 without
-- (bench/RESULTS.md, "Batch fast path and hot-path log", item 20).
-- The check could not fail: experiments are never deleted, and a server writes assignments only
-- for experiments it loaded from this database. It is dropped; so is its ON DELETE CASCADE (an
-- experiment deleted by hand leaves its assignments behind: delete them first).
ALTER TABLE assignments DROP CONSTRAINT IF EXISTS assignments_experiment_id_fkey;
