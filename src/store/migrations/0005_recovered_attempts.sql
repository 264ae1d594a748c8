-- pecgate store, migration 5: attempts whose bytes pecgate no longer has (issue 6).
-- After a restore from backup (or a reindex from an outdated dispatch.json) a letter can
-- be `queued` although an attempt was submitted after the backup. Its receipts name that
-- attempt's Message-ID in their signed daticert; ingest then records the attempt again
-- ('attempt.recovered' event) so that the letter is not sent a second time. The exact
-- bytes sent are not known then, so `eml_sha256` becomes nullable: NULL means "recovered
-- from a receipt, bytes unknown", never a guess. SQLite cannot drop NOT NULL in place:
-- the table is rebuilt with the same columns, keys and index.
CREATE TABLE attempts_v5 (
    dispatch_id TEXT NOT NULL REFERENCES dispatches (id),
    n           INTEGER NOT NULL CHECK (n >= 1),
    message_id  TEXT NOT NULL UNIQUE,       -- normalised, without brackets
    state       TEXT NOT NULL REFERENCES attempt_states (name),
    eml_sha256  TEXT REFERENCES messages (sha256),  -- the exact bytes sent; NULL: recovered
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    smtp_reply  TEXT,
    PRIMARY KEY (dispatch_id, n)
) STRICT;
INSERT INTO attempts_v5 (dispatch_id, n, message_id, state, eml_sha256, started_at,
                         finished_at, smtp_reply)
    SELECT dispatch_id, n, message_id, state, eml_sha256, started_at, finished_at, smtp_reply
    FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_v5 RENAME TO attempts;
CREATE INDEX attempts_by_state ON attempts (state);
