-- Assignment ids and user ids compare byte by byte (collation "C"). Both are opaque keys: they
-- are only ever looked up by equality, never shown in a language's order. Under the database's
-- default collation every comparison in their indexes (the primary key, and
-- (experiment_id, user_id, created_at)) went through the C library's strcoll; a write-behind
-- COPY makes about twenty of them per index per row. On the embedded server (collation
-- C.UTF-8), COPYs of 200,000 assignments with random user ids into a table growing to 2,000,000
-- rows: "C" took them faster in 8 of 10 same-sitting pairs, by 1.17x at the median (0.98-1.44x;
-- bench/RESULTS.md, "Batch fast path and hot-path log", item 23). A
-- database whose default is a language's collation (en_US.UTF-8, ICU) pays more per strcoll.
--
-- Equality is the same under both collations (they are deterministic), so every lookup finds
-- the same rows. Changing a column's collation rebuilds the indexes that hold it (not the
-- table), under an exclusive lock on assignments for as long as that takes.
ALTER TABLE assignments
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
