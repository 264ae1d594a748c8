-- pecgate store, migration 2: look up a mailbox's events (pecgate report) without a scan.
CREATE INDEX events_by_mailbox ON events (mailbox, seq);
