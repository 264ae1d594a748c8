//! The hash chain over `events`: each row carries the SHA-256 of the one before it.
//!
//! # Canonical encoding (version 1)
//!
//! `hash` is the lowercase hex SHA-256 of these bytes, concatenated:
//!
//! ```text
//! "pecgate-event-v1" LF
//! prev_hash LF                      64 lowercase hex characters; 64 '0' for seq 1
//! field(seq)                        decimal, no sign, no leading zeros
//! field(at)                         the stored text, e.g. 2026-03-01T09:05:07Z
//! field(mailbox)
//! field(dispatch_id)
//! field(event)
//! field(cause)
//! field(detail)                     the stored JSON text, byte for byte
//!
//! field(NULL)  = "-" LF
//! field(value) = <byte length in decimal> ":" <UTF-8 bytes> LF
//! ```
//!
//! The length prefix makes the encoding unambiguous whatever the fields contain
//! (newlines, colons, a `-`), and the hash is computed over the stored text, so
//! verification never depends on re-serialising JSON or re-formatting a time.
//!
//! What it shows: a changed, removed or inserted row breaks the chain at that row (a
//! changed row fails its own hash; a removed one leaves a gap in `seq` and a `prev_hash`
//! that does not match). What it cannot show on its own: the removal of the newest rows,
//! or a rewrite of the whole chain by someone with write access; anchor the newest
//! `hash` elsewhere (`pecgate status` prints it) to cover those.

use std::fmt::Write as _;

use rusqlite::{OptionalExtension, params};

use super::error::{StoreError, sql};
use super::{EventRow, NewEvent, time};

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const DOMAIN: &[u8] = b"pecgate-event-v1\n";

/// The fields of one event as stored, for hashing.
pub(crate) struct Canonical<'a> {
    pub prev_hash: &'a str,
    pub seq: i64,
    pub at: &'a str,
    pub mailbox: Option<&'a str>,
    pub dispatch_id: Option<&'a str>,
    pub event: &'a str,
    pub cause: &'a str,
    pub detail: &'a str,
}

impl Canonical<'_> {
    /// The canonical bytes (see the module documentation).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.detail.len());
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(self.prev_hash.as_bytes());
        out.push(b'\n');
        let seq = self.seq.to_string();
        for field in [
            Some(seq.as_str()),
            Some(self.at),
            self.mailbox,
            self.dispatch_id,
            Some(self.event),
            Some(self.cause),
            Some(self.detail),
        ] {
            match field {
                None => out.extend_from_slice(b"-\n"),
                Some(v) => {
                    out.extend_from_slice(v.len().to_string().as_bytes());
                    out.push(b':');
                    out.extend_from_slice(v.as_bytes());
                    out.push(b'\n');
                }
            }
        }
        out
    }

    /// The lowercase hex SHA-256 of [`Canonical::encode`].
    pub(crate) fn hash(&self) -> String {
        hex(&openssl::sha::sha256(&self.encode()))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The lowercase hex SHA-256 of `bytes` (what the archive and the tables use).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&openssl::sha::sha256(bytes))
}

/// Appends `ev` inside the caller's transaction and returns the stored row.
pub(crate) fn append(
    conn: &rusqlite::Connection,
    path: &str,
    ev: &NewEvent,
) -> Result<EventRow, StoreError> {
    const OP: &str = "append_event";
    if ev.event.is_empty() {
        return Err(StoreError::Invalid("event name is empty".into()));
    }
    let detail = serde_json::to_string(&ev.detail)
        .map_err(|e| StoreError::Invalid(format!("event detail is not JSON: {e}")))?;
    let last: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(sql(path, OP))?;
    // AUTOINCREMENT remembers the highest seq ever used, so a removed newest row still
    // leaves a gap that `verify` reports.
    let used: i64 = conn
        .prepare_cached(
            "SELECT coalesce(max(seq), 0) FROM \
             (SELECT seq FROM sqlite_sequence WHERE name = 'events' \
              UNION ALL SELECT max(seq) FROM events)",
        )
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql(path, OP))?;
    let seq = used + 1;
    let prev_hash = last.map_or_else(|| GENESIS_HASH.to_owned(), |(_, h)| h);
    let at = time::fmt(ev.at);
    let hash = Canonical {
        prev_hash: &prev_hash,
        seq,
        at: &at,
        mailbox: ev.mailbox.as_deref(),
        dispatch_id: ev.dispatch_id.as_deref(),
        event: &ev.event,
        cause: &ev.cause,
        detail: &detail,
    }
    .hash();
    conn.prepare_cached(
        "INSERT INTO events (seq, at, mailbox, dispatch_id, event, cause, detail, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            seq,
            at,
            ev.mailbox,
            ev.dispatch_id,
            ev.event,
            ev.cause,
            detail,
            prev_hash,
            hash
        ])
    })
    .map_err(sql(path, OP))?;
    Ok(EventRow {
        seq,
        at: time::parse(&at).unwrap_or(ev.at),
        mailbox: ev.mailbox.clone(),
        dispatch_id: ev.dispatch_id.clone(),
        event: ev.event.clone(),
        cause: ev.cause.clone(),
        detail,
        prev_hash,
        hash,
    })
}

/// The result of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// How many events were read.
    pub events: u64,
    /// The first `seq` whose row does not fit the chain (wrong hash, wrong `prev_hash`,
    /// or a gap before it); `None` when the chain is intact.
    pub first_bad: Option<i64>,
    /// The `hash` of the newest event (the genesis value for an empty log): anchor it
    /// elsewhere to detect a truncated or rewritten log later.
    pub head: String,
}

impl ChainReport {
    /// Whether every event fits the chain.
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Walks `events` in `seq` order, one row at a time.
pub(crate) fn verify(conn: &rusqlite::Connection, path: &str) -> Result<ChainReport, StoreError> {
    const OP: &str = "verify_chain";
    let mut stmt = conn
        .prepare(
            "SELECT seq, at, mailbox, dispatch_id, event, cause, detail, prev_hash, hash \
             FROM events ORDER BY seq",
        )
        .map_err(sql(path, OP))?;
    let mut rows = stmt.query([]).map_err(sql(path, OP))?;
    let mut report = ChainReport {
        events: 0,
        first_bad: None,
        head: GENESIS_HASH.to_owned(),
    };
    let mut expected_seq = 1;
    while let Some(row) = rows.next().map_err(sql(path, OP))? {
        let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<_> {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, String>(8)?,
            ))
        };
        let (seq, at, mailbox, dispatch_id, event, cause, detail, prev_hash, hash) =
            read(row).map_err(sql(path, OP))?;
        report.events += 1;
        if report.first_bad.is_none() {
            let recomputed = Canonical {
                prev_hash: &prev_hash,
                seq,
                at: &at,
                mailbox: mailbox.as_deref(),
                dispatch_id: dispatch_id.as_deref(),
                event: &event,
                cause: &cause,
                detail: &detail,
            }
            .hash();
            if seq != expected_seq || prev_hash != report.head || recomputed != hash {
                report.first_bad = Some(seq);
            }
        }
        expected_seq = seq + 1;
        report.head = hash;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_length_prefixed_and_null_aware() {
        let c = Canonical {
            prev_hash: GENESIS_HASH,
            seq: 12,
            at: "2026-03-01T09:05:07Z",
            mailbox: Some("protocollo"),
            dispatch_id: None,
            event: "dispatch.queued",
            cause: "outbox",
            detail: "{\"a\":\"x\\ny\"}",
        };
        let expected = format!(
            "pecgate-event-v1\n{GENESIS_HASH}\n2:12\n20:2026-03-01T09:05:07Z\n10:protocollo\n-\n\
             15:dispatch.queued\n6:outbox\n12:{{\"a\":\"x\\ny\"}}\n"
        );
        assert_eq!(String::from_utf8(c.encode()).unwrap(), expected);
        assert_eq!(c.hash(), sha256_hex(expected.as_bytes()));
        assert_eq!(c.hash().len(), 64);
    }

    #[test]
    fn empty_and_null_differ() {
        let mut c = Canonical {
            prev_hash: GENESIS_HASH,
            seq: 1,
            at: "x",
            mailbox: None,
            dispatch_id: None,
            event: "e",
            cause: "c",
            detail: "{}",
        };
        let null = c.hash();
        c.mailbox = Some("");
        assert_ne!(null, c.hash());
    }

    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
