-- Assignments of a large write-behind flush, kept as one block until they are expanded into
-- `assignments`. Each new row of `assignments` lands in three indexes, two of them at random
-- pages; on the embedded server that bounds a flush to 65,000-95,000 rows/s, and with it
-- durable `AllocateBatch`. The same rows as one bytea (the binary COPY stream the write-behind
-- already builds, LZ4-compressed by the server off its event loop, about 20 bytes per
-- assignment against 100) went in at 3.5-5 million assignments/s, flushes of 200,000
-- (bench/RESULTS.md, "Batch fast path and hot-path log", item 26).
--
-- A block is as durable as the rows: it is written in the flush's transaction. The server
-- expands blocks into `assignments` in the background while flushes are small (one block per
-- transaction: the rows inserted, the block deleted), and every reader of `assignments`
-- (lookups of assignments not held in memory, restarts, data-protection export and erasure)
-- expands all blocks first. The rows in blocks are bounded by
-- `backpressure.max_unexpanded_assignments`; past it, flushes write rows again.
CREATE TABLE assignment_blocks (
    id         bigserial   PRIMARY KEY,
    rows       integer     NOT NULL CHECK (rows > 0),
    -- binary COPY stream of the write-behind's assignment columns (ASSIGNMENT_COPY_COLUMNS),
    -- as an LZ4 block with its length in front (allocsvc.core.decompress_block)
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Compressed already: PostgreSQL stores them as they are.
ALTER TABLE assignment_blocks ALTER COLUMN payload SET STORAGE EXTERNAL;
