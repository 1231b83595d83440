-- One row per committed write-behind flush (assignments, segments, traffic and allocation
-- counts in one transaction). A flush whose commit went unacknowledged (the connection dropped)
-- is retried with the same token: finding it, the retry changes nothing, so counts and traffic
-- are never added twice. Tokens older than a day are deleted by later flushes.

CREATE TABLE write_behind_flushes (
    token      text        PRIMARY KEY,
    flushed_at timestamptz NOT NULL DEFAULT now()
);
