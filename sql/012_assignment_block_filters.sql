-- A Bloom filter per assignment block (allocsvc.core.block_filter): the (experiment, user)
-- pairs and the ids of its assignments. A lookup of one user's latest assignment, or of one
-- assignment by id, expands only the blocks whose filter may hold it (about 0.1% of the
-- others pass), not every block: after a long batch burst that was minutes of work
-- (bench/RESULTS.md, "Batch fast path and hot-path log", item 27). Blocks stored before this
-- column have none and are expanded for every lookup, as before. Restarts, exports and
-- erasures expand every block.
ALTER TABLE assignment_blocks ADD COLUMN filter bytea;
ALTER TABLE assignment_blocks ALTER COLUMN filter SET STORAGE EXTERNAL;
