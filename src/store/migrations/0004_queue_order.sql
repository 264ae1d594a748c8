-- pecgate store, migration 4: the sender's queue (`next_queued`: one mailbox's
-- `queued` dispatches ORDER BY created_at, id) read in index order. Times have second
-- precision, so a large batch puts hundreds of letters in the same second; without `id`
-- in the index SQLite sorted every row of the oldest second on each call (EXPLAIN QUERY
-- PLAN: "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY"). The new index has the old one's
-- columns as its prefix, so it serves every query the old one did.
CREATE INDEX dispatches_by_mailbox_state_id ON dispatches (mailbox, state, created_at, id);
DROP INDEX dispatches_by_mailbox_state;
