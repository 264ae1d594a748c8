-- pecgate store, migration 1: the whole schema.
--
-- Conventions (see src/store/mod.rs for the full story):
--   * times are RFC 3339 UTC text, second precision, fixed width: 'YYYY-MM-DDTHH:MM:SSZ'
--     (sorts lexicographically = chronologically; readable in the sqlite3 shell);
--   * SHA-256 values are 64 lowercase hex characters;
--   * Message-IDs are stored normalised (no angle brackets, no whitespace);
--   * e-mail addresses are stored lower case;
--   * state names live in small lookup tables referenced by foreign keys, so that a
--     later migration can add a state with one INSERT instead of rebuilding a table;
--   * every table is STRICT: a value of the wrong type is an error, not a silent cast.

-- State names (DESIGN.md "Names that several parts share").
CREATE TABLE dispatch_states (name TEXT PRIMARY KEY) STRICT, WITHOUT ROWID;
INSERT INTO dispatch_states (name) VALUES
    ('queued'), ('sending'), ('submitted'), ('uncertain'), ('accepted'), ('not-accepted'),
    ('refused'), ('delivered'), ('partially-delivered'), ('failed');

CREATE TABLE recipient_states (name TEXT PRIMARY KEY) STRICT, WITHOUT ROWID;
INSERT INTO recipient_states (name) VALUES
    ('pending'), ('delivered'), ('warned'), ('failed'), ('timed-out'), ('external');

CREATE TABLE attempt_states (name TEXT PRIMARY KEY) STRICT, WITHOUT ROWID;
INSERT INTO attempt_states (name) VALUES
    ('sending'), ('submitted'), ('uncertain'), ('refused'), ('failed-transient');

-- The archive index: every raw message ever sent or received, by SHA-256. The file
-- itself lives at <archive root>/<path>; `path` is relative so the archive can move.
CREATE TABLE messages (
    sha256           TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL CHECK (size >= 0),
    direction        TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    mailbox          TEXT NOT NULL,
    imap_uid         INTEGER,
    imap_uidvalidity INTEGER,
    recorded_at      TEXT NOT NULL
) STRICT;
CREATE INDEX messages_by_mailbox ON messages (mailbox, direction);

-- One row per letter taken from an outbox.
CREATE TABLE dispatches (
    id             TEXT PRIMARY KEY CHECK (length(id) = 26),  -- ULID, upper case
    mailbox        TEXT NOT NULL,
    kind           TEXT NOT NULL,           -- document kind from the envelope
    protocol       TEXT,                    -- protocol number, if the clerk gave one
    reference      TEXT,
    subject        TEXT NOT NULL,
    receipt_type   TEXT NOT NULL,           -- completa | breve | sintetica
    in_reply_to    TEXT,
    state          TEXT NOT NULL REFERENCES dispatch_states (name),
    identificativo TEXT,                    -- the provider's id, from the acceptance
    accepted_at    TEXT,
    content_hash   TEXT NOT NULL CHECK (length(content_hash) = 64),
    source         TEXT NOT NULL,           -- outbox envelope name, e.g. 'massivo.csv#12'
    sent_dir       TEXT NOT NULL,           -- the letter's sent/YYYY/MM/<id>/ folder
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    error          TEXT                     -- last error worth showing a clerk
) STRICT;
CREATE INDEX dispatches_by_mailbox_state ON dispatches (mailbox, state, created_at);
CREATE INDEX dispatches_by_state ON dispatches (state, created_at);
CREATE INDEX dispatches_by_content_hash ON dispatches (mailbox, content_hash);
CREATE INDEX dispatches_by_protocol ON dispatches (protocol) WHERE protocol IS NOT NULL;
CREATE INDEX dispatches_by_identificativo ON dispatches (identificativo)
    WHERE identificativo IS NOT NULL;

CREATE TABLE recipients (
    dispatch_id TEXT NOT NULL REFERENCES dispatches (id),
    address     TEXT NOT NULL CHECK (address = lower(address)),
    position    INTEGER NOT NULL,           -- order in the envelope (to first, then cc)
    field       TEXT NOT NULL CHECK (field IN ('to', 'cc')),
    certified   INTEGER CHECK (certified IN (0, 1)),  -- NULL until a receipt tells
    state       TEXT NOT NULL REFERENCES recipient_states (name),
    detail      TEXT,                       -- why, in words (e.g. the provider's error)
    conflict    TEXT,                       -- contradicting evidence, when receipts disagree
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (dispatch_id, address),
    UNIQUE (dispatch_id, position)
) STRICT;
CREATE INDEX recipients_by_address ON recipients (address);

CREATE TABLE documents (
    dispatch_id TEXT NOT NULL REFERENCES dispatches (id),
    position    INTEGER NOT NULL,
    name        TEXT NOT NULL,
    sha256      TEXT NOT NULL CHECK (length(sha256) = 64),
    size        INTEGER NOT NULL CHECK (size >= 0),
    PRIMARY KEY (dispatch_id, position),
    UNIQUE (dispatch_id, name)
) STRICT;

-- Every SMTP submission attempt. The row is committed as 'sending' with its Message-ID
-- before the SMTP transaction starts (never twice: see docs/ARCHITECTURE.md).
CREATE TABLE attempts (
    dispatch_id TEXT NOT NULL REFERENCES dispatches (id),
    n           INTEGER NOT NULL CHECK (n >= 1),
    message_id  TEXT NOT NULL UNIQUE,       -- normalised, without brackets
    state       TEXT NOT NULL REFERENCES attempt_states (name),
    eml_sha256  TEXT NOT NULL REFERENCES messages (sha256),  -- the exact bytes sent
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    smtp_reply  TEXT,
    PRIMARY KEY (dispatch_id, n)
) STRICT;
CREATE INDEX attempts_by_state ON attempts (state);

-- A PEC receipt (or any provider message) taken in and judged.
CREATE TABLE receipts (
    id             INTEGER PRIMARY KEY,
    message_sha256 TEXT NOT NULL UNIQUE REFERENCES messages (sha256),
    kind           TEXT NOT NULL,           -- pec::kind wire name
    verdict        TEXT NOT NULL CHECK (verdict IN ('valid', 'invalid', 'unsigned')),
    reason         TEXT,
    dispatch_id    TEXT REFERENCES dispatches (id),  -- NULL for an orphan
    recipient      TEXT,
    identificativo TEXT,
    msgid          TEXT,                    -- normalised
    disposition    TEXT NOT NULL
        CHECK (disposition IN ('applied', 'duplicate', 'quarantined', 'orphan')),
    created_at     TEXT NOT NULL
) STRICT;
CREATE INDEX receipts_by_dispatch ON receipts (dispatch_id) WHERE dispatch_id IS NOT NULL;
CREATE INDEX receipts_by_identificativo ON receipts (identificativo)
    WHERE identificativo IS NOT NULL;
CREATE INDEX receipts_by_msgid ON receipts (msgid) WHERE msgid IS NOT NULL;
CREATE INDEX receipts_by_disposition ON receipts (disposition, created_at);

-- Certified mail received (posta-certificata envelopes), unpacked into an inbox folder.
CREATE TABLE incoming (
    message_sha256 TEXT PRIMARY KEY REFERENCES messages (sha256),
    mailbox        TEXT NOT NULL,
    identificativo TEXT,
    mittente       TEXT,
    oggetto        TEXT,
    folder         TEXT,                    -- inbox/YYYY/MM/<identificativo>/, once unpacked
    created_at     TEXT NOT NULL
) STRICT;
CREATE INDEX incoming_by_identificativo ON incoming (identificativo)
    WHERE identificativo IS NOT NULL;
CREATE INDEX incoming_by_mailbox ON incoming (mailbox, created_at);

-- IMAP synchronisation state, one row per configured mailbox.
CREATE TABLE mailbox_state (
    mailbox          TEXT PRIMARY KEY,
    uidvalidity      INTEGER,
    last_uid         INTEGER,
    last_sync_at     TEXT,
    suspended_reason TEXT,                  -- NULL = not suspended
    quota_used       INTEGER,
    quota_limit      INTEGER,
    updated_at       TEXT NOT NULL
) STRICT;

-- The audit trail: append-only and hash-chained (see src/store/chain.rs for the exact
-- canonical encoding). seq starts at 1 and has no gaps.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    mailbox     TEXT,
    dispatch_id TEXT REFERENCES dispatches (id),
    event       TEXT NOT NULL,              -- e.g. 'dispatch.submitted'
    cause       TEXT NOT NULL,              -- what made it happen, e.g. 'smtp', 'startup'
    detail      TEXT NOT NULL CHECK (json_valid(detail)),
    prev_hash   TEXT NOT NULL CHECK (length(prev_hash) = 64),
    hash        TEXT NOT NULL UNIQUE CHECK (length(hash) = 64)
) STRICT;
CREATE INDEX events_by_dispatch ON events (dispatch_id, seq) WHERE dispatch_id IS NOT NULL;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: update refused');
END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: delete refused');
END;
