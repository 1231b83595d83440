-- Blocks written from now on hold their assignments in a compact form: each batch's columns as
-- the server holds them (ids as numbers after one prefix, a segment key once per run of rows),
-- LZ4-compressed, instead of the binary COPY rows that expanding a block sends. Building a
-- block that way costs the write-behind's thread 73 ns an assignment against 130, and stores
-- a third of the bytes (bench/RESULTS.md, item 74). Every reader of a block reads both forms
-- (expansion through allocsvc.core.decompress_block, lookups and restarts through the Rust
-- core's block::each_row); blocks stored before stay as they are. Only the column's comment
-- changes here: the table is the same.
COMMENT ON COLUMN assignment_blocks.payload IS
    'Assignments of one or more write-behind flushes, LZ4-compressed with the length in front: '
    'a compact stream (allocsvc_core::compact, starting "allocsvc block 1") or, in blocks '
    'stored before migration 016, a binary COPY stream of ASSIGNMENT_COPY_COLUMNS. '
    'allocsvc.core.decompress_block gives the COPY stream of either.';
