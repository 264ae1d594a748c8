//! The store against real SQLite files in temporary directories: migrations, pragmas,
//! every typed operation, the hash-chained event log, the async handle, and a second
//! connection writing while the store is busy.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use pecgate::store::{
    self, Db, Direction, DispatchChange, Field, IncomingRow, MailboxState, MessageRow, NewDispatch,
    NewDocument, NewEvent, NewReceipt, NewRecipient, RecipientChange, SCHEMA_VERSION, Store,
    StoreError,
};
use serde_json::json;

/// A fixed clock: `t(0)` is 2026-02-25T06:13:20Z.
fn t(offset_s: i64) -> Timestamp {
    Timestamp::from_second(1_772_000_000 + offset_s).unwrap()
}

fn sha(tag: &str) -> String {
    store::sha256_hex(tag.as_bytes())
}

fn id(n: u64) -> String {
    store::dispatch_id_from_parts(1_772_000_000_000 + n, [n as u8; 10])
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("pecgate.db")
}

fn letter(n: u64, mailbox: &str) -> NewDispatch {
    NewDispatch {
        id: id(n),
        mailbox: mailbox.into(),
        kind: "lettera".into(),
        protocol: Some(format!("2026/{n:04}")),
        reference: Some(format!("rif-{n}")),
        subject: format!("Comunicazione {n}"),
        receipt_type: "completa".into(),
        in_reply_to: None,
        content_hash: sha(&format!("letter {n}")),
        source: format!("lettera-{n}.toml"),
        sent_dir: format!("sent/2026/02/{}", id(n)),
        created_at: t(n as i64),
        recipients: vec![
            NewRecipient {
                address: format!("Ufficio{n}@PEC.Example.it"),
                field: Field::To,
            },
            NewRecipient {
                address: "<copia@pec.example.it>".into(),
                field: Field::Cc,
            },
        ],
        documents: vec![
            NewDocument {
                name: "lettera.pdf".into(),
                sha256: sha(&format!("doc {n}")),
                size: 1234,
            },
            NewDocument {
                name: "allegato.xml".into(),
                sha256: sha(&format!("att {n}")),
                size: 56,
            },
        ],
    }
}

fn eml(tag: &str, mailbox: &str, at: Timestamp) -> MessageRow {
    let h = sha(tag);
    MessageRow {
        path: format!("{}/{}/{h}.eml", &h[..2], &h[2..4]),
        sha256: h,
        size: 4096,
        direction: Direction::Out,
        mailbox: mailbox.into(),
        imap_uid: None,
        imap_uidvalidity: None,
        recorded_at: at,
    }
}

/// Records the eml and begins an attempt; returns n.
fn start(db: &mut Db, dispatch: &str, tag: &str, at: Timestamp) -> u32 {
    let m = eml(tag, "protocollo", at);
    db.record_message(&m).unwrap();
    let mid = format!("<{dispatch}.{tag}@gw.example.it>");
    db.begin_attempt(dispatch, &mid, &m.sha256, at).unwrap()
}

fn event_names(db: &Db, dispatch: &str) -> Vec<String> {
    db.events_for(dispatch)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn raw(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

fn count(path: &Path, table: &str) -> i64 {
    raw(path)
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

// ---------------------------------------------------------------- opening and migrations

#[test]
fn fresh_file_gets_every_migration() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(db_path(&dir)).unwrap();
    assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION as usize, store::MIGRATIONS.len());
    const { assert!(SCHEMA_VERSION >= 2) };
    let c = raw(&db_path(&dir));
    for table in [
        "dispatches",
        "recipients",
        "attempts",
        "documents",
        "messages",
        "receipts",
        "incoming",
        "mailbox_state",
        "events",
    ] {
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "table {table}");
    }
    let idx: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'events_by_mailbox'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(idx, 1, "migration 2's index");
    // Opening again is a no-op.
    drop(db);
    let db = Db::open(db_path(&dir)).unwrap();
    assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn every_earlier_version_upgrades_with_data_kept() {
    for from in 0..SCHEMA_VERSION {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            let mut old = Db::open_at_version_for_tests(&path, from).unwrap();
            assert_eq!(old.schema_version().unwrap(), from);
            if from >= 1 {
                // Seeded with today's typed operations, which only use version-1 columns;
                // if a later migration changes those, seed version 1 with raw SQL instead.
                old.insert_dispatch(&letter(1, "protocollo")).unwrap();
                start(&mut old, &id(1), "a1", t(10));
            }
        }
        let mut db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION, "from {from}");
        if from >= 1 {
            let d = db.get(&id(1)).unwrap().expect("kept");
            assert_eq!(d.dispatch.state, "sending");
            assert_eq!(d.recipients.len(), 2);
            assert_eq!(d.attempts.len(), 1);
            assert_eq!(
                event_names(&db, &id(1)),
                ["dispatch.queued", "dispatch.sending"]
            );
        }
        // The upgraded file takes new writes and its chain holds.
        db.insert_dispatch(&letter(2, "protocollo")).unwrap();
        let report = db.verify_chain().unwrap();
        assert!(report.is_intact(), "from {from}: {report:?}");
    }
}

#[test]
fn a_newer_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    raw(&path).pragma_update(None, "user_version", 99).unwrap();
    let err = Db::open(&path).unwrap_err();
    match &err {
        StoreError::TooNew { found, known, .. } => {
            assert_eq!(*found, 99);
            assert_eq!(*known, i64::from(SCHEMA_VERSION));
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("newer"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    // Nothing was touched.
    let v: i64 = raw(&path)
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99);
}

#[test]
fn pragmas_are_really_set() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(db_path(&dir)).unwrap();
    let p = db.pragmas().unwrap();
    assert_eq!(p.journal_mode, "wal");
    assert_eq!(p.synchronous, 2, "FULL");
    assert!(p.foreign_keys);
    assert_eq!(p.busy_timeout_ms, 5000);
    assert_eq!(p.user_version, i64::from(SCHEMA_VERSION));
}

#[test]
fn a_file_that_is_not_a_database_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::write(
        &path,
        b"this is not sqlite, not at all; long enough to have a header....",
    )
    .unwrap();
    let err = Db::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

// ---------------------------------------------------------------- typed operations

#[test]
fn insert_and_read_a_dispatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    let l = letter(1, "protocollo");
    db.insert_dispatch(&l).unwrap();

    let d = db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.id, l.id);
    assert_eq!(d.dispatch.state, "queued");
    assert_eq!(d.dispatch.kind, "lettera");
    assert_eq!(d.dispatch.protocol.as_deref(), Some("2026/0001"));
    assert_eq!(d.dispatch.created_at, t(1));
    assert_eq!(d.dispatch.updated_at, t(1));
    assert_eq!(d.dispatch.identificativo, None);
    let addrs: Vec<_> = d
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.field))
        .collect();
    assert_eq!(
        addrs,
        [
            ("ufficio1@pec.example.it", Field::To),
            ("copia@pec.example.it", Field::Cc)
        ]
    );
    assert!(
        d.recipients
            .iter()
            .all(|r| r.state == "pending" && r.certified.is_none())
    );
    let docs: Vec<_> = d.documents.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(docs, ["lettera.pdf", "allegato.xml"]);
    assert_eq!(d.documents[0].size, 1234);
    assert!(d.attempts.is_empty());

    let ev = db.events_for(&l.id).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event, "dispatch.queued");
    assert_eq!(ev[0].cause, "outbox");
    assert_eq!(ev[0].mailbox.as_deref(), Some("protocollo"));
    let detail: serde_json::Value = serde_json::from_str(&ev[0].detail).unwrap();
    assert_eq!(detail["source"], "lettera-1.toml");
    assert_eq!(
        detail["recipients"][0]["address"],
        "ufficio1@pec.example.it"
    );
    assert_eq!(detail["documents"][1]["name"], "allegato.xml");

    // Duplicate detection by content hash, per mailbox.
    let found = db
        .find_by_content_hash("protocollo", &l.content_hash)
        .unwrap()
        .unwrap();
    assert_eq!(found.id, l.id);
    assert!(
        db.find_by_content_hash("altra", &l.content_hash)
            .unwrap()
            .is_none()
    );
    assert!(
        db.find_by_content_hash("protocollo", &sha("nope"))
            .unwrap()
            .is_none()
    );

    // The same id twice is a constraint error; nothing changes.
    let err = db.insert_dispatch(&l).unwrap_err();
    assert!(err.is_constraint(), "{err:?}");
    assert_eq!(db.events_for(&l.id).unwrap().len(), 1);
    assert!(db.get(&id(99)).unwrap().is_none());
}

#[test]
fn insert_dispatch_rejects_malformed_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();

    let mut l = letter(1, "protocollo");
    l.id = "not-a-ulid".into();
    assert!(matches!(
        db.insert_dispatch(&l),
        Err(StoreError::Invalid(_))
    ));

    let mut l = letter(1, "protocollo");
    l.id = l.id.to_lowercase();
    assert!(
        matches!(db.insert_dispatch(&l), Err(StoreError::Invalid(_))),
        "canonical only"
    );

    let mut l = letter(1, "protocollo");
    l.recipients[1].address = "UFFICIO1@pec.example.it".into();
    let err = db.insert_dispatch(&l).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");

    let mut l = letter(1, "protocollo");
    l.recipients.clear();
    assert!(matches!(
        db.insert_dispatch(&l),
        Err(StoreError::Invalid(_))
    ));

    let mut l = letter(1, "protocollo");
    l.documents[1].name = "lettera.pdf".into();
    assert!(matches!(
        db.insert_dispatch(&l),
        Err(StoreError::Invalid(_))
    ));

    let mut l = letter(1, "protocollo");
    l.content_hash = "ABC".into();
    assert!(matches!(
        db.insert_dispatch(&l),
        Err(StoreError::Invalid(_))
    ));

    assert_eq!(count(&db_path(&dir), "dispatches"), 0);
    assert_eq!(count(&db_path(&dir), "events"), 0);
}

#[test]
fn attempts_go_through_sending_to_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    let l = letter(1, "protocollo");
    db.insert_dispatch(&l).unwrap();
    assert_eq!(db.next_queued("protocollo", 10).unwrap().len(), 1);

    let n1 = start(&mut db, &l.id, "a1", t(10));
    assert_eq!(n1, 1);
    assert_eq!(db.get(&l.id).unwrap().unwrap().dispatch.state, "sending");
    assert!(db.next_queued("protocollo", 10).unwrap().is_empty());
    assert_eq!(db.sending_at_startup().unwrap(), [(l.id.clone(), 1)]);

    // A second attempt while one is sending is refused.
    let m = eml("a1b", "protocollo", t(11));
    db.record_message(&m).unwrap();
    let err = db
        .begin_attempt(&l.id, "<x@y>", &m.sha256, t(11))
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    db.attempt_transient(&l.id, 1, "421 4.7.0 try again later", t(12))
        .unwrap();
    let d = db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "queued");
    assert_eq!(
        d.dispatch.error.as_deref(),
        Some("421 4.7.0 try again later")
    );
    assert_eq!(d.attempts[0].state, "failed-transient");
    assert_eq!(d.attempts[0].finished_at, Some(t(12)));
    assert!(db.sending_at_startup().unwrap().is_empty());

    let n2 = start(&mut db, &l.id, "a2", t(20));
    assert_eq!(n2, 2);
    db.attempt_submitted(&l.id, 2, "250 2.0.0 Ok: queued as 1234", t(21))
        .unwrap();
    let d = db.get(&l.id).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "submitted");
    assert_eq!(d.dispatch.error, None, "submitted clears the error");
    assert_eq!(d.attempts.len(), 2);
    assert_eq!(d.attempts[1].state, "submitted");
    assert_eq!(
        d.attempts[1].message_id,
        format!("{}.a2@gw.example.it", l.id)
    );
    assert_eq!(d.attempts[1].eml_sha256, sha("a2"));
    assert_eq!(d.attempts[1].started_at, t(20));
    assert_eq!(
        d.attempts[1].smtp_reply.as_deref(),
        Some("250 2.0.0 Ok: queued as 1234")
    );

    // Finishing an attempt twice is refused.
    let err = db.attempt_submitted(&l.id, 2, "250", t(22)).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = db.attempt_submitted(&l.id, 9, "250", t(22)).unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    assert_eq!(
        event_names(&db, &l.id),
        [
            "dispatch.queued",
            "dispatch.sending",
            "dispatch.queued",
            "dispatch.sending",
            "dispatch.submitted"
        ]
    );
    let ev = db.events_for(&l.id).unwrap();
    let last: serde_json::Value = serde_json::from_str(&ev[4].detail).unwrap();
    assert_eq!(last["from"], "sending");
    assert_eq!(last["to"], "submitted");
    assert_eq!(last["attempt"], 2);
    assert!(db.verify_chain().unwrap().is_intact());
}

#[test]
fn begin_attempt_needs_a_recorded_message_and_a_fresh_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();
    db.insert_dispatch(&letter(2, "protocollo")).unwrap();

    let err = db
        .begin_attempt(&id(1), "<m1@gw>", &sha("never recorded"), t(5))
        .unwrap_err();
    assert!(err.is_constraint(), "{err:?}");
    assert_eq!(
        db.get(&id(1)).unwrap().unwrap().dispatch.state,
        "queued",
        "rolled back"
    );

    let m = eml("e", "protocollo", t(5));
    db.record_message(&m).unwrap();
    db.begin_attempt(&id(1), "<m1@gw>", &m.sha256, t(5))
        .unwrap();
    let err = db
        .begin_attempt(&id(2), " m1@gw ", &m.sha256, t(6))
        .unwrap_err();
    assert!(
        err.is_constraint(),
        "same Message-ID after normalising: {err:?}"
    );

    let err = db
        .begin_attempt(&id(3), "<m3@gw>", &m.sha256, t(6))
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = db.begin_attempt(&id(2), "<>", &m.sha256, t(6)).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

#[test]
fn refused_and_uncertain() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();
    db.insert_dispatch(&letter(2, "protocollo")).unwrap();
    start(&mut db, &id(1), "r", t(10));
    start(&mut db, &id(2), "u", t(11));

    db.attempt_refused(&id(1), 1, "554 5.7.1 recipient rejected", t(12))
        .unwrap();
    let d = db.get(&id(1)).unwrap().unwrap();
    assert_eq!(
        (d.dispatch.state.as_str(), d.attempts[0].state.as_str()),
        ("refused", "refused")
    );
    assert_eq!(
        d.dispatch.error.as_deref(),
        Some("554 5.7.1 recipient rejected")
    );

    // As at start-up after a crash: whatever is still `sending` becomes uncertain.
    let left = db.sending_at_startup().unwrap();
    assert_eq!(left, [(id(2), 1)]);
    for (d, n) in left {
        db.mark_uncertain(&d, n, "startup: found sending", t(100))
            .unwrap();
    }
    let d = db.get(&id(2)).unwrap().unwrap();
    assert_eq!(d.dispatch.state, "uncertain");
    assert_eq!(d.attempts[0].state, "uncertain");
    assert_eq!(d.attempts[0].smtp_reply, None);
    let ev = db.events_for(&id(2)).unwrap();
    assert_eq!(ev.last().unwrap().event, "dispatch.uncertain");
    assert_eq!(ev.last().unwrap().cause, "startup: found sending");
    assert!(db.sending_at_startup().unwrap().is_empty());
    // Never resent blindly: an uncertain dispatch cannot start an attempt.
    let m = eml("u2", "protocollo", t(101));
    db.record_message(&m).unwrap();
    assert!(matches!(
        db.begin_attempt(&id(2), "<u2@gw>", &m.sha256, t(101)),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn generic_state_setters() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();
    start(&mut db, &id(1), "a", t(10));
    db.attempt_submitted(&id(1), 1, "250 ok", t(11)).unwrap();

    let mut ch = DispatchChange::new("accepted", "receipt:abc", t(20));
    ch.identificativo = Some("opec21.20260225071400.12345.01.1.1@pec.example.it".into());
    ch.accepted_at = Some(t(19));
    ch.detail = json!({"receipt": "accettazione"});
    db.set_dispatch_state(&id(1), &ch).unwrap();
    let d = db.get(&id(1)).unwrap().unwrap().dispatch;
    assert_eq!(d.state, "accepted");
    assert_eq!(d.accepted_at, Some(t(19)));
    assert_eq!(d.updated_at, t(20));
    assert_eq!(
        d.identificativo.as_deref(),
        Some("opec21.20260225071400.12345.01.1.1@pec.example.it")
    );

    let mut rc = RecipientChange::new("delivered", "receipt:def", t(30));
    rc.certified = Some(true);
    rc.note = Some("consegnata".into());
    db.set_recipient_state(&id(1), "UFFICIO1@pec.example.it", &rc)
        .unwrap();
    let mut rc = RecipientChange::new("failed", "receipt:ghi", t(31));
    rc.certified = Some(false);
    rc.conflict = Some("delivery then failure".into());
    db.set_recipient_state(&id(1), "copia@pec.example.it", &rc)
        .unwrap();
    let r = db.get(&id(1)).unwrap().unwrap().recipients;
    assert_eq!(r[0].state, "delivered");
    assert_eq!(r[0].certified, Some(true));
    assert_eq!(r[0].detail.as_deref(), Some("consegnata"));
    assert_eq!(r[0].updated_at, t(30));
    assert_eq!(r[1].state, "failed");
    assert_eq!(r[1].certified, Some(false));
    assert_eq!(r[1].conflict.as_deref(), Some("delivery then failure"));

    // An empty string clears; None keeps.
    let mut rc = RecipientChange::new("failed", "operator", t(32));
    rc.conflict = Some(String::new());
    db.set_recipient_state(&id(1), "copia@pec.example.it", &rc)
        .unwrap();
    let r = db.get(&id(1)).unwrap().unwrap().recipients;
    assert_eq!(r[1].conflict, None);
    assert_eq!(r[1].certified, Some(false));

    let mut ch = DispatchChange::new("partially-delivered", "receipt:ghi", t(40));
    ch.error = Some("copia@pec.example.it: failed".into());
    db.set_dispatch_state(&id(1), &ch).unwrap();
    let d = db.get(&id(1)).unwrap().unwrap().dispatch;
    assert_eq!(d.state, "partially-delivered");
    assert_eq!(d.accepted_at, Some(t(19)), "kept");

    // Unknown names and targets.
    let err = db
        .set_dispatch_state(&id(1), &DispatchChange::new("stale", "x", t(50)))
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("stale"));
    let err = db
        .set_recipient_state(
            &id(1),
            "copia@pec.example.it",
            &RecipientChange::new("queued", "x", t(50)),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = db
        .set_recipient_state(
            &id(1),
            "nobody@x.it",
            &RecipientChange::new("failed", "x", t(50)),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = db
        .set_dispatch_state(&id(7), &DispatchChange::new("failed", "x", t(50)))
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    let ev = db.events_for(&id(1)).unwrap();
    let names: Vec<_> = ev.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "dispatch.queued",
            "dispatch.sending",
            "dispatch.submitted",
            "dispatch.accepted",
            "recipient.delivered",
            "recipient.failed",
            "recipient.failed",
            "dispatch.partially-delivered"
        ]
    );
    let acc: serde_json::Value = serde_json::from_str(&ev[3].detail).unwrap();
    assert_eq!(acc["from"], "submitted");
    assert_eq!(acc["to"], "accepted");
    assert_eq!(acc["receipt"], "accettazione");
    assert_eq!(ev[3].cause, "receipt:abc");
    let rec: serde_json::Value = serde_json::from_str(&ev[4].detail).unwrap();
    assert_eq!(rec["recipient"], "ufficio1@pec.example.it");
    assert_eq!(rec["certified"], true);
}

#[test]
fn find_by_id_message_id_protocol_or_identificativo() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    for n in 1..=3 {
        db.insert_dispatch(&letter(n, "protocollo")).unwrap();
    }
    start(&mut db, &id(2), "x", t(10));
    db.attempt_transient(&id(2), 1, "421", t(11)).unwrap();
    start(&mut db, &id(2), "y", t(12));
    let mut ch = DispatchChange::new("accepted", "receipt", t(13));
    ch.identificativo = Some("opec.123@pec.example.it".into());
    db.set_dispatch_state(&id(2), &ch).unwrap();

    let ids =
        |key: &str| -> Vec<String> { db.find(key).unwrap().into_iter().map(|d| d.id).collect() };
    assert_eq!(ids(&id(1)), [id(1)]);
    assert_eq!(
        ids(&id(1).to_lowercase()),
        [id(1)],
        "ULIDs are case-insensitive"
    );
    let mid = format!("{}.x@gw.example.it", id(2));
    assert_eq!(ids(&mid), [id(2)], "without brackets");
    assert_eq!(ids(&format!("<{mid}>")), [id(2)], "with brackets");
    assert_eq!(ids(&format!("  < {mid} >\n")), [id(2)], "with whitespace");
    assert_eq!(
        ids(&format!("<{}.y@gw.example.it>", id(2))),
        [id(2)],
        "any attempt"
    );
    assert_eq!(ids("2026/0003"), [id(3)], "protocol number");
    assert_eq!(ids("opec.123@pec.example.it"), [id(2)], "identificativo");
    assert!(ids("unknown@nowhere").is_empty());
    assert!(ids("   ").is_empty());
}

#[test]
fn list_filters_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    for n in 1..=4 {
        db.insert_dispatch(&letter(n, "protocollo")).unwrap();
    }
    for n in 5..=6 {
        db.insert_dispatch(&letter(n, "ragioneria")).unwrap();
    }
    start(&mut db, &id(2), "s2", t(10));
    db.attempt_submitted(&id(2), 1, "250", t(11)).unwrap();
    start(&mut db, &id(5), "s5", t(12));
    db.attempt_submitted(&id(5), 1, "250", t(13)).unwrap();

    let collect = |state: Option<&str>, mailbox: Option<&str>| -> Vec<String> {
        let mut out = Vec::new();
        let n = db
            .list(state, mailbox, |d| {
                out.push(d.dispatch.id.clone());
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n as usize, out.len());
        out
    };
    assert_eq!(collect(None, None), (1..=6).map(id).collect::<Vec<_>>());
    assert_eq!(collect(Some("submitted"), None), [id(2), id(5)]);
    assert_eq!(collect(None, Some("ragioneria")), [id(5), id(6)]);
    assert_eq!(
        collect(Some("queued"), Some("protocollo")),
        [id(1), id(3), id(4)]
    );
    assert!(collect(Some("failed"), None).is_empty());
    assert!(collect(None, Some("nessuna")).is_empty());

    // Each row comes with its details; Break stops early.
    let mut seen = Vec::new();
    let n = db
        .list(Some("submitted"), None, |d| {
            assert_eq!(d.recipients.len(), 2);
            assert_eq!(d.documents.len(), 2);
            assert_eq!(d.attempts.len(), 1);
            seen.push(d.dispatch.id);
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!((n, seen.len()), (1, 1));

    let err = db
        .list(Some("bogus"), None, |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    let counts = db.state_counts().unwrap();
    let flat: Vec<_> = counts
        .iter()
        .map(|c| (c.mailbox.as_str(), c.state.as_str(), c.count))
        .collect();
    assert_eq!(
        flat,
        [
            ("protocollo", "queued", 3),
            ("protocollo", "submitted", 1),
            ("ragioneria", "queued", 1),
            ("ragioneria", "submitted", 1)
        ]
    );
}

#[test]
fn messages_receipts_and_incoming() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();

    let mut m = eml("ricevuta", "protocollo", t(50));
    m.direction = Direction::In;
    m.imap_uid = Some(42);
    m.imap_uidvalidity = Some(7);
    assert!(db.record_message(&m).unwrap());
    let mut again = m.clone();
    again.path = "elsewhere.eml".into();
    assert!(!db.record_message(&again).unwrap(), "idempotent on sha256");
    assert_eq!(
        db.message(&m.sha256).unwrap().unwrap(),
        m,
        "the first record stands"
    );
    let mut bad = m.clone();
    bad.sha256 = "xyz".into();
    assert!(matches!(
        db.record_message(&bad),
        Err(StoreError::Invalid(_))
    ));

    let r = NewReceipt {
        message_sha256: m.sha256.clone(),
        kind: "avvenuta-consegna".into(),
        verdict: "valid".into(),
        reason: None,
        dispatch_id: Some(id(1)),
        recipient: Some("Ufficio1@PEC.example.it".into()),
        identificativo: Some("opec.1@pec.example.it".into()),
        msgid: Some("<abc@gw>".into()),
        disposition: "applied".into(),
        created_at: t(51),
    };
    let rid = db.record_receipt(&r).unwrap().expect("new");
    assert_eq!(db.record_receipt(&r).unwrap(), None, "once per message");
    let got = db.receipts_for(&id(1)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, rid);
    assert_eq!(
        got[0].receipt.recipient.as_deref(),
        Some("ufficio1@pec.example.it")
    );
    assert_eq!(got[0].receipt.msgid.as_deref(), Some("abc@gw"));
    assert_eq!(event_names(&db, &id(1)).last().unwrap(), "receipt.applied");

    let mut orphan = r.clone();
    orphan.message_sha256 = sha("orphan");
    assert!(matches!(
        db.record_receipt(&orphan),
        Err(StoreError::NotFound(_))
    ));
    let mut om = eml("orphan", "protocollo", t(60));
    om.direction = Direction::In;
    db.record_message(&om).unwrap();
    orphan.dispatch_id = None;
    orphan.disposition = "orphan".into();
    orphan.verdict = "unsigned".into();
    db.record_receipt(&orphan).unwrap().unwrap();
    orphan.verdict = "maybe".into();
    assert!(matches!(
        db.record_receipt(&orphan),
        Err(StoreError::Invalid(_))
    ));

    let mut im = eml("incoming", "protocollo", t(70));
    im.direction = Direction::In;
    db.record_message(&im).unwrap();
    let inc = IncomingRow {
        message_sha256: im.sha256.clone(),
        mailbox: "protocollo".into(),
        identificativo: Some("opec.9@pec.other.it".into()),
        mittente: Some("ente@pec.other.it".into()),
        oggetto: Some("Richiesta".into()),
        folder: Some("inbox/2026/02/opec.9".into()),
        created_at: t(71),
    };
    assert!(db.record_incoming(&inc).unwrap());
    assert!(!db.record_incoming(&inc).unwrap());
    assert_eq!(db.incoming(&im.sha256).unwrap().unwrap(), inc);
    assert!(db.verify_chain().unwrap().is_intact());
    // receipt.applied, receipt.orphan, incoming.received + the dispatch's queued.
    assert_eq!(db.verify_chain().unwrap().events, 4);
}

#[test]
fn mailbox_state_round_trips_and_logs_suspension() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    assert!(db.mailbox_state("protocollo").unwrap().is_none());

    let mut st = MailboxState::new("protocollo", t(1));
    st.uidvalidity = Some(1_700_000_000);
    st.last_uid = Some(41);
    st.last_sync_at = Some(t(1));
    st.quota_used = Some(10 << 30);
    st.quota_limit = Some(u64::from(u32::MAX) * 4);
    db.set_mailbox_state(&st, "imap").unwrap();
    assert_eq!(db.mailbox_state("protocollo").unwrap().unwrap(), st);

    st.last_uid = Some(42);
    st.suspended_reason = Some("authentication failed".into());
    st.updated_at = t(2);
    db.set_mailbox_state(&st, "imap").unwrap();
    let got = db.mailbox_state("protocollo").unwrap().unwrap();
    assert!(got.is_suspended());
    assert_eq!(got.last_uid, Some(42));

    st.suspended_reason = None;
    st.updated_at = t(3);
    db.set_mailbox_state(&st, "operator").unwrap();
    assert!(
        !db.mailbox_state("protocollo")
            .unwrap()
            .unwrap()
            .is_suspended()
    );
    db.set_mailbox_state(&MailboxState::new("ragioneria", t(4)), "imap")
        .unwrap();
    assert_eq!(db.mailbox_states().unwrap().len(), 2);

    let c = raw(&db_path(&dir));
    let names: Vec<(String, String)> = c
        .prepare("SELECT event, cause FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        names,
        [
            ("mailbox.suspended".to_owned(), "imap".to_owned()),
            ("mailbox.resumed".to_owned(), "operator".to_owned())
        ]
    );
}

// ---------------------------------------------------------------- the event log

#[test]
fn the_chain_verifies_and_shows_tampering_at_the_right_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut db = Db::open(&path).unwrap();
    let empty = db.verify_chain().unwrap();
    assert_eq!((empty.events, empty.first_bad), (0, None));
    assert_eq!(empty.head, store::GENESIS_HASH);

    for n in 1..=3 {
        db.insert_dispatch(&letter(n, "protocollo")).unwrap();
    }
    let ev = db
        .append_event(&NewEvent {
            at: t(9),
            mailbox: None,
            dispatch_id: None,
            event: "daemon.started".into(),
            cause: "systemd".into(),
            detail: json!({"version": "0.1.0", "odd": "line\nbreak: -"}),
        })
        .unwrap();
    assert_eq!(ev.seq, 4);
    start(&mut db, &id(1), "a", t(10));

    let report = db.verify_chain().unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(report.first_bad, None);
    let all: Vec<(i64, String, String)> = raw(&path)
        .prepare("SELECT seq, prev_hash, hash FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(all[0].1, store::GENESIS_HASH);
    for w in all.windows(2) {
        assert_eq!(w[1].1, w[0].2, "prev_hash links");
    }
    assert_eq!(report.head, all[4].2);
    drop(db);

    // Someone with the sqlite3 shell drops the trigger and edits event 3.
    let c = raw(&path);
    c.execute_batch(
        "DROP TRIGGER events_no_update; \
         UPDATE events SET detail = '{\"source\":\"forged\"}' WHERE seq = 3;",
    )
    .unwrap();
    let db = Db::open(&path).unwrap();
    let report = db.verify_chain().unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(report.first_bad, Some(3));

    // Replacing its hash as well does not help: the row still fails its own hash (and a
    // correctly recomputed one would no longer match seq 4's prev_hash).
    c.execute(
        "UPDATE events SET hash = ?1 WHERE seq = 3",
        [store::sha256_hex(b"forged")],
    )
    .unwrap();
    assert_eq!(db.verify_chain().unwrap().first_bad, Some(3));
}

#[test]
fn removing_an_event_shows_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut db = Db::open(&path).unwrap();
    for n in 1..=4 {
        db.insert_dispatch(&letter(n, "protocollo")).unwrap();
    }
    raw(&path)
        .execute_batch("DROP TRIGGER events_no_delete; DELETE FROM events WHERE seq = 2;")
        .unwrap();
    assert_eq!(db.verify_chain().unwrap().first_bad, Some(3));

    // Removing the newest row cannot be seen by itself, but the next append leaves a gap.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut db = Db::open(&path).unwrap();
    for n in 1..=3 {
        db.insert_dispatch(&letter(n, "protocollo")).unwrap();
    }
    raw(&path)
        .execute_batch("DROP TRIGGER events_no_delete; DELETE FROM events WHERE seq = 3;")
        .unwrap();
    assert!(db.verify_chain().unwrap().is_intact());
    db.insert_dispatch(&letter(4, "protocollo")).unwrap();
    let report = db.verify_chain().unwrap();
    assert_eq!(report.first_bad, Some(4));
}

#[test]
fn events_refuse_update_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut db = Db::open(&path).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();
    let c = raw(&path);
    let err = c
        .execute("UPDATE events SET cause = 'x' WHERE seq = 1", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = c.execute("DELETE FROM events", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(count(&path, "events"), 1);
    // Events must name a real dispatch.
    let err = db
        .append_event(&NewEvent {
            at: t(1),
            mailbox: None,
            dispatch_id: Some(id(9)),
            event: "x.y".into(),
            cause: "test".into(),
            detail: json!({}),
        })
        .unwrap_err();
    assert!(err.is_constraint(), "{err:?}");
    assert!(db.verify_chain().unwrap().is_intact());
}

#[test]
fn a_failed_transaction_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let mut db = Db::open(&path).unwrap();

    // The closure fails after inserting a dispatch (with its event).
    let err = db
        .write("test", |tx| {
            tx.insert_dispatch(&letter(1, "protocollo"))?;
            assert!(tx.get(&id(1))?.is_some(), "visible inside the transaction");
            Err::<(), _>(StoreError::Invalid("stop here".into()))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    assert!(db.get(&id(1)).unwrap().is_none());

    // SQLite fails midway: the dispatch is in, then the attempt's foreign key fails.
    let err = db
        .write("test", |tx| {
            tx.insert_dispatch(&letter(2, "protocollo"))?;
            tx.begin_attempt(&id(2), "<m@gw>", &sha("not archived"), t(3))
        })
        .unwrap_err();
    assert!(err.is_constraint(), "{err:?}");
    assert!(db.get(&id(2)).unwrap().is_none());

    for table in [
        "dispatches",
        "recipients",
        "documents",
        "attempts",
        "events",
    ] {
        assert_eq!(count(&path, table), 0, "{table}");
    }
    // And the sequence was not consumed: the next event is seq 1.
    db.insert_dispatch(&letter(3, "protocollo")).unwrap();
    assert_eq!(db.events_for(&id(3)).unwrap()[0].seq, 1);
    assert!(db.verify_chain().unwrap().is_intact());

    // Several operations commit together.
    db.write("test", |tx| {
        tx.insert_dispatch(&letter(4, "protocollo"))?;
        tx.set_dispatch_state(&id(4), &DispatchChange::new("failed", "operator", t(5)))
    })
    .unwrap();
    assert_eq!(db.get(&id(4)).unwrap().unwrap().dispatch.state, "failed");
}

#[test]
fn backup_copies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(db_path(&dir)).unwrap();
    db.insert_dispatch(&letter(1, "protocollo")).unwrap();
    let copy = dir.path().join("copy.db");
    db.backup_to(&copy).unwrap();
    let b = Db::open(&copy).unwrap();
    assert!(b.get(&id(1)).unwrap().is_some());
    assert!(b.verify_chain().unwrap().is_intact());
    assert!(db.checkpoint().unwrap());
    db.close().unwrap();
}

// ---------------------------------------------------------------- the async handle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_call_the_store_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db_path(&dir)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=40u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let mailbox = if n % 2 == 0 {
                "protocollo"
            } else {
                "ragioneria"
            };
            store
                .call(move |db| db.insert_dispatch(&letter(n, mailbox)))
                .await?;
            let dispatch = id(n);
            store
                .call(move |db| {
                    let m = eml(&format!("e{n}"), "protocollo", t(100));
                    db.record_message(&m)?;
                    let k = db.begin_attempt(&dispatch, &format!("<{n}@gw>"), &m.sha256, t(100))?;
                    db.attempt_submitted(&dispatch, k, "250", t(101))
                })
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let (submitted, report) = store
        .call(|db| {
            let mut n = 0;
            db.list(Some("submitted"), None, |_| {
                n += 1;
                ControlFlow::Continue(())
            })?;
            Ok((n, db.verify_chain()?))
        })
        .await
        .unwrap();
    assert_eq!(submitted, 40);
    assert_eq!(report.events, 40 * 3);
    assert!(report.is_intact());

    // A panicking closure is reported; the store lives on.
    let err = store
        .call(|_db| -> store::Result<()> { panic!("boom") })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Panicked(m) if m.contains("boom")),
        "{err:?}"
    );
    assert!(store.call(|db| db.get(&id(1))).await.unwrap().is_some());

    let other = store.clone();
    store.close().await.unwrap();
    assert!(matches!(
        other.call(|db| db.schema_version()).await,
        Err(StoreError::Closed)
    ));
    // The WAL was checkpointed into the main file.
    let wal = dir.path().join("pecgate.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_errors_come_back_from_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/pecgate.db");
    let err = Store::open(&missing).await.unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");

    let path = db_path(&dir);
    raw(&path).pragma_update(None, "user_version", 99).unwrap();
    let err = Store::open(&path).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found: 99, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_waits_while_the_store_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).await.unwrap();
    store
        .call(|db| db.insert_dispatch(&letter(1, "protocollo")))
        .await
        .unwrap();

    // The store thread holds a write transaction for a while…
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let hold = Duration::from_millis(600);
    let busy = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .call(move |db| {
                    db.write("hold", |tx| {
                        tx.insert_dispatch(&letter(2, "protocollo"))?;
                        locked_tx.send(()).unwrap();
                        std::thread::sleep(hold);
                        Ok(())
                    })
                })
                .await
        })
    };
    // …while a CLI command (another connection, here on a plain thread) writes.
    let cli_path = path.clone();
    let cli = std::thread::spawn(move || {
        locked_rx.recv().unwrap();
        let started = Instant::now();
        let mut db = Db::open(&cli_path)?;
        db.set_dispatch_state(&id(1), &DispatchChange::new("failed", "operator", t(5)))?;
        let seen = db.get(&id(2))?.is_some();
        Ok::<_, StoreError>((started.elapsed(), seen))
    });
    busy.await.unwrap().unwrap();
    let (waited, saw_the_store_commit) = tokio::task::spawn_blocking(move || cli.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        waited >= hold / 2,
        "the second writer waited ({waited:?}) instead of failing"
    );
    assert!(saw_the_store_commit, "and then saw the store's commit");

    let (state, report) = store
        .call(|db| Ok((db.get(&id(1))?.unwrap().dispatch.state, db.verify_chain()?)))
        .await
        .unwrap();
    assert_eq!(state, "failed");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events, 3);
    store.close().await.unwrap();
}
