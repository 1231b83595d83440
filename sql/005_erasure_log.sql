-- Erasure log: every erasure (Admin.DeleteUserData) of the region, so that every process
-- serving it (other replicas, other --workers) drops the user from its memory. Each process
-- polls the rows after the last id it has seen.
--
-- A row names the user only by a keyed hash (HMAC-SHA256 with erasure_key.key), never by the
-- id itself: the log outlives the erasure, and an unkeyed hash of an id is as good as the id.
-- The key is random per deployment (one row, written by the first process that needs it).

CREATE TABLE erasure_key (
    id  smallint PRIMARY KEY CHECK (id = 1),
    key bytea    NOT NULL CHECK (length(key) >= 32)
);

CREATE TABLE erasure_log (
    id        bigserial   PRIMARY KEY,
    user_hash bytea       NOT NULL CHECK (length(user_hash) = 32),
    -- The receipt of the erasure (its audit target is 'erasure:<receipt>').
    receipt   text        NOT NULL,
    erased_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX erasure_log_erased_at ON erasure_log (erased_at);
