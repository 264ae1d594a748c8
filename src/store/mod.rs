//! The store: pecgate's state in one SQLite file.
//!
//! Owns the schema, its migrations, every typed query, and the append-only, hash-chained
//! event log. Must never run on a tokio worker thread: [`Db`] is the synchronous API over
//! one `rusqlite::Connection`; inside the daemon exactly one dedicated thread owns it and
//! [`Store`] is the async handle that sends it closures over a channel. It knows no PEC
//! rule: states arrive as names (checked against the lists below and the lookup tables),
//! and the transitions are decided by `pec::state` (issue 6), not here.
//!
//! # Durability and concurrency
//!
//! * WAL journal with `synchronous=FULL`: a commit is on disk when it returns, so the
//!   `sending` row that guards an SMTP submission survives a power cut.
//! * `foreign_keys=ON`, `busy_timeout` 5 s, every write in a `BEGIN IMMEDIATE`
//!   transaction: a second process (a CLI command while the daemon runs) opens its own
//!   [`Db`] on the same file; SQLite's file locks serialise the writers and the loser
//!   *waits* up to 5 s instead of failing. Readers never block the writer (WAL).
//! * Each typed operation is one transaction, and every state change writes its event in
//!   that same transaction: either both are on disk or neither is. [`Db::write`] gives a
//!   caller (the ingest path) one transaction around several operations through [`Tx`].
//!
//! # Conventions
//!
//! * Times are RFC 3339 UTC text with second precision and fixed width,
//!   `YYYY-MM-DDTHH:MM:SSZ`: they sort as text, read well in the `sqlite3` shell, and hash
//!   the same forever. The API takes and returns `jiff::Timestamp`; sub-seconds are
//!   dropped on the way in. Order among events is `events.seq`, not time.
//! * SHA-256 values are 64 lowercase hex characters ([`sha256_hex`]).
//! * Message-IDs are stored as `pec::ids::normalize_message_id` makes them (no brackets).
//! * Addresses are stored as `pec::ids::canonical_address` makes them (lower case).
//! * Migrations are forward only: `PRAGMA user_version` is the number applied; a file
//!   newer than this binary is refused ([`StoreError::TooNew`]). Each migration runs in
//!   its own transaction; the SQL lives in `src/store/migrations/`.
//!
//! The event hash chain's canonical encoding is documented in `chain.rs` (see
//! [`ChainReport`]).

mod chain;
mod db;
mod error;
mod handle;
mod id;
mod inbound;
mod query;
mod rebuild;
mod time;
mod tx;

use jiff::Timestamp;

pub use chain::{ChainReport, GENESIS_HASH, hex, sha256_hex};
pub use db::{Db, MIGRATIONS, Pragmas, SCHEMA_VERSION};
pub use error::StoreError;
pub use handle::Store;
pub use id::{
    DISPATCH_ID_LEN, canonical_dispatch_id, dispatch_id_from_parts, dispatch_id_time_ms,
    is_dispatch_id, new_dispatch_id,
};
pub use inbound::{CursorUpdate, DeadlineCutoffs};
pub use query::{ReceiptCount, ReportLetter, ReportRecipient};
pub use rebuild::RestoredAttempt;
pub use tx::Tx;

/// The suspension `restore` and `reindex` put on every mailbox
/// (`mailbox_state.suspended_reason`): letters `queued` in a database
/// brought back from a backup (or rebuilt) may have been sent after it, so
/// nothing is sent until the mailbox has been read completely once; the
/// acceptances of such letters (their Message-IDs name the dispatch) then
/// mark them accepted instead of letting them go out a second time.
/// [`Db::save_cursor`] lifts it at the first complete sync.
pub const HOLD_UNTIL_SYNC: &str =
    "restored: sending waits until the mailbox has been read completely once";

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Dispatch states (DESIGN.md); the `dispatch_states` table holds the same list.
pub const DISPATCH_STATES: &[&str] = &[
    "queued",
    "sending",
    "submitted",
    "uncertain",
    "accepted",
    "not-accepted",
    "refused",
    "delivered",
    "partially-delivered",
    "failed",
];

/// Recipient states (DESIGN.md); the `recipient_states` table holds the same list.
pub const RECIPIENT_STATES: &[&str] = &[
    "pending",
    "delivered",
    "warned",
    "failed",
    "timed-out",
    "external",
];

/// SMTP attempt states; the `attempt_states` table holds the same list.
pub const ATTEMPT_STATES: &[&str] = &[
    "sending",
    "submitted",
    "uncertain",
    "refused",
    "failed-transient",
];

/// Receipt verdicts (the signature check's outcome).
pub const VERDICTS: &[&str] = &["valid", "invalid", "unsigned"];

/// What ingest did with a receipt.
pub const DISPOSITIONS: &[&str] = &["applied", "duplicate", "quarantined", "orphan"];

pub(crate) fn check_name(what: &str, list: &[&str], name: &str) -> Result<()> {
    if list.contains(&name) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("unknown {what} {name:?}")))
    }
}

/// A recipient's header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `To:`
    To,
    /// `Cc:`
    Cc,
}

impl Field {
    /// The stored spelling: `to` or `cc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::To => "to",
            Field::Cc => "cc",
        }
    }
}

impl std::str::FromStr for Field {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "to" => Ok(Field::To),
            "cc" => Ok(Field::Cc),
            other => Err(StoreError::Invalid(format!(
                "unknown recipient field {other:?}"
            ))),
        }
    }
}

/// A message's direction in the archive index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by pecgate (the exact bytes of an attempt).
    Out,
    /// Fetched from a mailbox (receipts, incoming certified mail, anything else).
    In,
}

impl Direction {
    /// The stored spelling: `out` or `in`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

impl std::str::FromStr for Direction {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "out" => Ok(Direction::Out),
            "in" => Ok(Direction::In),
            other => Err(StoreError::Invalid(format!("unknown direction {other:?}"))),
        }
    }
}

/// A letter to record as `queued`, with its recipients and documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDispatch {
    /// The ULID the outbox made ([`new_dispatch_id`]); it also names the sent folder.
    pub id: String,
    /// The configured mailbox's short name.
    pub mailbox: String,
    /// The document kind from the envelope.
    pub kind: String,
    /// The protocol number, if the clerk gave one.
    pub protocol: Option<String>,
    /// The clerk's own reference.
    pub reference: Option<String>,
    /// The subject as sent.
    pub subject: String,
    /// `completa`, `breve` or `sintetica`.
    pub receipt_type: String,
    /// The Message-ID this letter answers, if any.
    pub in_reply_to: Option<String>,
    /// SHA-256 of the letter (envelope fields + documents), for duplicate detection.
    pub content_hash: String,
    /// The outbox envelope it came from (`certificato-77.toml`, `massivo.csv#12`).
    pub source: String,
    /// The sent folder, as configured paths make it.
    pub sent_dir: String,
    /// When it was taken in.
    pub created_at: Timestamp,
    /// In envelope order; addresses are stored lower case and must be distinct.
    pub recipients: Vec<NewRecipient>,
    /// In envelope order; names must be distinct.
    pub documents: Vec<NewDocument>,
}

/// One recipient of a [`NewDispatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecipient {
    /// The address (stored lower case, without brackets).
    pub address: String,
    /// `to` or `cc`.
    pub field: Field,
}

impl NewRecipient {
    /// The recipients of a letter: the `to` addresses, then the `cc` ones,
    /// in their order.
    #[must_use]
    pub fn to_and_cc(to: &[String], cc: &[String]) -> Vec<NewRecipient> {
        let field = |f: Field| {
            move |a: &String| NewRecipient {
                address: a.clone(),
                field: f,
            }
        };
        to.iter()
            .map(field(Field::To))
            .chain(cc.iter().map(field(Field::Cc)))
            .collect()
    }
}

/// One document of a [`NewDispatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDocument {
    /// The file name as sent.
    pub name: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A `dispatches` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRow {
    /// The ULID.
    pub id: String,
    /// The mailbox's short name.
    pub mailbox: String,
    /// The document kind.
    pub kind: String,
    /// The protocol number.
    pub protocol: Option<String>,
    /// The clerk's reference.
    pub reference: Option<String>,
    /// The subject.
    pub subject: String,
    /// The receipt type asked for.
    pub receipt_type: String,
    /// The Message-ID answered.
    pub in_reply_to: Option<String>,
    /// One of [`DISPATCH_STATES`].
    pub state: String,
    /// The provider's id, from the acceptance receipt.
    pub identificativo: Option<String>,
    /// When the provider accepted it.
    pub accepted_at: Option<Timestamp>,
    /// SHA-256 of the letter.
    pub content_hash: String,
    /// The outbox envelope it came from.
    pub source: String,
    /// Its sent folder.
    pub sent_dir: String,
    /// When it was taken in.
    pub created_at: Timestamp,
    /// When its row last changed.
    pub updated_at: Timestamp,
    /// The last error worth showing a clerk.
    pub error: Option<String>,
}

/// A `recipients` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRow {
    /// The dispatch.
    pub dispatch_id: String,
    /// Lower case.
    pub address: String,
    /// `to` or `cc`.
    pub field: Field,
    /// Whether the address is a PEC mailbox; `None` until a receipt tells.
    pub certified: Option<bool>,
    /// One of [`RECIPIENT_STATES`].
    pub state: String,
    /// Why, in words.
    pub detail: Option<String>,
    /// Contradicting evidence, when receipts disagree.
    pub conflict: Option<String>,
    /// When the row last changed.
    pub updated_at: Timestamp,
}

/// An `attempts` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    /// The dispatch.
    pub dispatch_id: String,
    /// 1, 2, … in order.
    pub n: u32,
    /// Normalised, without brackets.
    pub message_id: String,
    /// One of [`ATTEMPT_STATES`].
    pub state: String,
    /// SHA-256 of the exact bytes sent (a `messages` row); empty for an
    /// attempt recovered from a receipt, whose bytes are not known.
    pub eml_sha256: String,
    /// When the attempt was committed as `sending`.
    pub started_at: Timestamp,
    /// When the SMTP transaction ended, if it did.
    pub finished_at: Option<Timestamp>,
    /// The relay's last reply.
    pub smtp_reply: Option<String>,
}

/// A `documents` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRow {
    /// The file name as sent.
    pub name: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A dispatch with everything that hangs off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchDetail {
    /// The dispatch itself.
    pub dispatch: DispatchRow,
    /// In envelope order.
    pub recipients: Vec<RecipientRow>,
    /// In order of `n`.
    pub attempts: Vec<AttemptRow>,
    /// In envelope order.
    pub documents: Vec<DocumentRow>,
}

/// A `messages` row: one archived raw message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// SHA-256 of the raw bytes; the archive file's name.
    pub sha256: String,
    /// Relative to the archive root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Sent or received.
    pub direction: Direction,
    /// The mailbox's short name.
    pub mailbox: String,
    /// The IMAP UID it was fetched with.
    pub imap_uid: Option<u32>,
    /// The folder's UIDVALIDITY at that time.
    pub imap_uidvalidity: Option<u32>,
    /// When it was archived.
    pub recorded_at: Timestamp,
}

/// A receipt to record (ingest, issue 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReceipt {
    /// The archived message (a `messages` row, recorded first).
    pub message_sha256: String,
    /// The PEC kind's wire name.
    pub kind: String,
    /// One of [`VERDICTS`].
    pub verdict: String,
    /// Why the verdict is not `valid`, or other remarks.
    pub reason: Option<String>,
    /// The dispatch it belongs to; `None` for an orphan.
    pub dispatch_id: Option<String>,
    /// The recipient it speaks of (stored lower case).
    pub recipient: Option<String>,
    /// From the daticert.
    pub identificativo: Option<String>,
    /// From the daticert (stored normalised).
    pub msgid: Option<String>,
    /// One of [`DISPOSITIONS`].
    pub disposition: String,
    /// When it was taken in.
    pub created_at: Timestamp,
}

/// A `receipts` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRow {
    /// Row id.
    pub id: i64,
    /// The receipt's fields as recorded.
    pub receipt: NewReceipt,
}

/// Certified mail received, to record (ingest, issue 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingRow {
    /// The archived envelope (a `messages` row, recorded first).
    pub message_sha256: String,
    /// The mailbox's short name.
    pub mailbox: String,
    /// From the daticert.
    pub identificativo: Option<String>,
    /// From the daticert.
    pub mittente: Option<String>,
    /// From the daticert.
    pub oggetto: Option<String>,
    /// The inbox folder it was unpacked into.
    pub folder: Option<String>,
    /// When it was taken in.
    pub created_at: Timestamp,
}

/// IMAP synchronisation state of one mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxState {
    /// The mailbox's short name.
    pub mailbox: String,
    /// The folder's UIDVALIDITY the cursor belongs to.
    pub uidvalidity: Option<u32>,
    /// The highest UID taken in.
    pub last_uid: Option<u32>,
    /// When the last synchronisation finished.
    pub last_sync_at: Option<Timestamp>,
    /// Why the mailbox is suspended; `None` when it is not.
    pub suspended_reason: Option<String>,
    /// Bytes used, from IMAP QUOTA.
    pub quota_used: Option<u64>,
    /// Bytes allowed, from IMAP QUOTA.
    pub quota_limit: Option<u64>,
    /// When the row last changed.
    pub updated_at: Timestamp,
}

impl MailboxState {
    /// A mailbox never synchronised.
    pub fn new(mailbox: impl Into<String>, at: Timestamp) -> Self {
        MailboxState {
            mailbox: mailbox.into(),
            uidvalidity: None,
            last_uid: None,
            last_sync_at: None,
            suspended_reason: None,
            quota_used: None,
            quota_limit: None,
            updated_at: at,
        }
    }

    /// Whether the mailbox is suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended_reason.is_some()
    }
}

/// An event to append to the log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// When it happened.
    pub at: Timestamp,
    /// The mailbox concerned, if any.
    pub mailbox: Option<String>,
    /// The dispatch concerned, if any.
    pub dispatch_id: Option<String>,
    /// `<entity>.<what>`, e.g. `dispatch.submitted`.
    pub event: String,
    /// What made it happen: `outbox`, `smtp`, `startup`, `receipt:<sha256>`, `operator`…
    pub cause: String,
    /// Structured detail (stored as compact JSON text).
    pub detail: serde_json::Value,
}

/// An `events` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// 1, 2, … without gaps.
    pub seq: i64,
    /// When it happened (second precision).
    pub at: Timestamp,
    /// The mailbox concerned.
    pub mailbox: Option<String>,
    /// The dispatch concerned.
    pub dispatch_id: Option<String>,
    /// Event name.
    pub event: String,
    /// What made it happen.
    pub cause: String,
    /// The JSON text as stored (and hashed).
    pub detail: String,
    /// The previous event's `hash`.
    pub prev_hash: String,
    /// This event's hash (see `chain.rs`).
    pub hash: String,
}

/// A dispatch state change for [`Db::set_dispatch_state`].
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchChange {
    /// The new state, one of [`DISPATCH_STATES`].
    pub state: String,
    /// What made it happen (the event's `cause`).
    pub cause: String,
    /// When.
    pub at: Timestamp,
    /// Extra structured detail for the event (an object is merged with `from`/`to`).
    pub detail: serde_json::Value,
    /// Set `identificativo` when `Some`.
    pub identificativo: Option<String>,
    /// Set `accepted_at` when `Some`.
    pub accepted_at: Option<Timestamp>,
    /// Set `error` when `Some` (an empty string clears it).
    pub error: Option<String>,
}

impl DispatchChange {
    /// A change to `state` with no extra detail.
    pub fn new(state: impl Into<String>, cause: impl Into<String>, at: Timestamp) -> Self {
        DispatchChange {
            state: state.into(),
            cause: cause.into(),
            at,
            detail: serde_json::Value::Object(Default::default()),
            identificativo: None,
            accepted_at: None,
            error: None,
        }
    }
}

/// A recipient state change for [`Db::set_recipient_state`].
#[derive(Debug, Clone, PartialEq)]
pub struct RecipientChange {
    /// The new state, one of [`RECIPIENT_STATES`].
    pub state: String,
    /// What made it happen (the event's `cause`).
    pub cause: String,
    /// When.
    pub at: Timestamp,
    /// Extra structured detail for the event (an object is merged with `from`/`to`).
    pub detail: serde_json::Value,
    /// Set `certified` when `Some`.
    pub certified: Option<bool>,
    /// Set the row's `detail` text when `Some` (an empty string clears it).
    pub note: Option<String>,
    /// Set `conflict` when `Some` (an empty string clears it).
    pub conflict: Option<String>,
}

impl RecipientChange {
    /// A change to `state` with no extra detail.
    pub fn new(state: impl Into<String>, cause: impl Into<String>, at: Timestamp) -> Self {
        RecipientChange {
            state: state.into(),
            cause: cause.into(),
            at,
            detail: serde_json::Value::Object(Default::default()),
            certified: None,
            note: None,
            conflict: None,
        }
    }
}

/// Dispatch counts by mailbox and state (for `pecgate status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    /// The mailbox's short name.
    pub mailbox: String,
    /// The state.
    pub state: String,
    /// How many dispatches.
    pub count: u64,
}
