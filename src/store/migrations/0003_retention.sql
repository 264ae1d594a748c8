-- pecgate store, migration 3: server-side retention (issue 6). A message fetched over
-- IMAP is moved or expunged on the server once it has been archived and recorded long
-- enough; `retained_at` says when that was done, so that it is done once.
ALTER TABLE messages ADD COLUMN retained_at TEXT;
CREATE INDEX messages_for_retention ON messages (mailbox, imap_uidvalidity, recorded_at)
    WHERE imap_uid IS NOT NULL AND retained_at IS NULL;
