//! Acceptance tests of the inbound half under faults (issue 6): the real
//! `pecgate run` binary reading the office mailbox of an in-process sandbox
//! (`Gateway::start_full`), with connections dropped after DATA, SIGKILLs,
//! Dovecot restarts and a UIDVALIDITY change; operator decisions with
//! `pecgate resolve`; webmail flags; incoming certified mail with hostile
//! attachment names and anomaly envelopes; server-side retention.
//!
//! Everything is read back the way an operator or a clerk would: `pecgate
//! list/show --json`, the daemon's JSON log, the store, the sent and inbox
//! folders, and the sandbox mailboxes over IMAP (what each recipient really
//! got).
//!
//! Dovecot must be installed (see tests/sandbox_support).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use outbound_support::*;
use pecgate::pec::kind::Kind;
use sandbox_support::{
    ANAGRAFE, ANNA, Attachment, Env, GIULIA, LUCA, Letter, MARIO, OFFICE, Sys, imap_login, within,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers

/// The sandbox's grace period for uncertain letters (0.1 min).
const GRACE: Duration = Duration::from_secs(6);

/// Puts a one-recipient letter into the outbox.
fn post(gw: &Gateway, name: &str, to: &str, subject: &str) {
    drop_letter(
        &gw.outbox(),
        name,
        &format!("to = [\"{to}\"]\nsubject = \"{subject}\"\nbody = \"Testo della lettera.\"\n"),
        &[],
    );
}

/// How many transport envelopes of the letter `subject` a mailbox holds.
fn envelopes(list: &[Sys], subject: &str) -> usize {
    let want = format!("POSTA CERTIFICATA: {subject}");
    list.iter()
        .filter(|m| m.kind == Kind::Transport && m.subject.as_deref() == Some(want.as_str()))
        .count()
}

/// The events of a letter in the store: (name, cause).
fn events_of(gw: &Gateway, id: &str) -> Vec<(String, String)> {
    gw.db()
        .events_for(id)
        .expect("events")
        .into_iter()
        .map(|e| (e.event, e.cause))
        .collect()
}

/// The attempts of a letter: (Message-ID, state).
fn attempts_of(gw: &Gateway, id: &str) -> Vec<(String, String)> {
    gw.db()
        .get(id)
        .expect("get")
        .expect("dispatch in the store")
        .attempts
        .into_iter()
        .map(|a| (a.message_id, a.state))
        .collect()
}

/// Waits until the letter `id` is in `state`; returns its `list` entry.
async fn wait_state(gw: &Gateway, id: &str, state: &str, limit: Duration) -> Value {
    let list = gw
        .wait_list(&format!("{id} {state}"), limit, |l| {
            l.iter()
                .any(|d| d["dispatch_id"] == id && d["state"] == state)
        })
        .await;
    list.into_iter()
        .find(|d| d["dispatch_id"] == id)
        .expect("listed")
}

/// Waits until a letter with this subject exists and is in `state`.
async fn wait_subject(gw: &Gateway, subject: &str, state: &str, limit: Duration) -> Value {
    let list = gw
        .wait_list(&format!("{subject:?} {state}"), limit, |l| {
            l.iter()
                .any(|d| d["subject"] == subject && d["state"] == state)
        })
        .await;
    by_subject(&list, subject).clone()
}

/// `pecgate show KEY --json`: the one timeline.
async fn show(gw: &Gateway, key: &str) -> Value {
    let out = gw.command(&["show", key, "--json"]).await;
    assert!(
        out.status.success(),
        "pecgate show {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one timeline for {key}: {text}");
    serde_json::from_str(lines[0]).expect("show --json is JSON")
}

/// `pecgate resolve ID FLAG`: exit code and everything printed.
async fn resolve(gw: &Gateway, id: &str, flag: &str) -> (Option<i32>, String) {
    let out = gw.command(&["resolve", id, flag]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The receipts filed in a letter's sent folder (`NN-*.eml` but the
/// letter's own `00-*`), sorted.
fn filed_receipts(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(".eml") && !n.starts_with("00-"))
        .collect()
}

/// Every file under `dir`, recursively (sorted).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The flags of every message of a folder of the office mailbox, by UID
/// (EXAMINE: reading them changes nothing).
async fn office_flags(env: &Env, folder: &str) -> Vec<(u32, Vec<String>)> {
    let mut s = imap_login(&env.info, OFFICE).await.expect("IMAP login");
    let mb = s.examine(folder).await.expect("EXAMINE");
    let mut out: Vec<(u32, Vec<String>)> = if mb.exists == 0 {
        Vec::new()
    } else {
        let fetched: Vec<_> = s
            .uid_fetch("1:*", "(UID FLAGS)")
            .await
            .expect("FETCH FLAGS")
            .try_collect()
            .await
            .expect("FETCH FLAGS");
        fetched
            .iter()
            .map(|f| {
                (
                    f.uid.expect("UID"),
                    f.flags().map(|fl| format!("{fl:?}")).collect(),
                )
            })
            .collect()
    };
    out.sort();
    let _ = s.logout().await;
    out
}

/// The bytes of every message of a folder of the office mailbox, by UID.
async fn office_folder(env: &Env, folder: &str) -> Vec<Vec<u8>> {
    let mut s = imap_login(&env.info, OFFICE).await.expect("IMAP login");
    let mb = s.examine(folder).await.expect("EXAMINE");
    if mb.exists == 0 {
        let _ = s.logout().await;
        return Vec::new();
    }
    let mut fetched: Vec<(u32, Vec<u8>)> = s
        .uid_fetch("1:*", "(UID BODY.PEEK[])")
        .await
        .expect("FETCH")
        .try_collect::<Vec<_>>()
        .await
        .expect("FETCH")
        .iter()
        .map(|f| (f.uid.expect("UID"), f.body().expect("BODY[]").to_vec()))
        .collect();
    fetched.sort();
    let _ = s.logout().await;
    fetched.into_iter().map(|f| f.1).collect()
}

/// `doveadm mailbox update --uid-validity VALUE` on the office INBOX (what
/// a server does when it rebuilds a mailbox).
fn set_office_uidvalidity(env: &Env, value: u32) {
    let doveadm = sandbox_support::find_program("doveadm").expect("doveadm installed");
    let out = std::process::Command::new(doveadm)
        .arg("-c")
        .arg(env.dir().join("dovecot").join("dovecot.conf"))
        .args(["mailbox", "update", "-u", OFFICE, "--uid-validity"])
        .arg(value.to_string())
        .arg("INBOX")
        .output()
        .expect("run doveadm");
    assert!(
        out.status.success(),
        "doveadm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// 1. Connection dropped after DATA, the provider took the letter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_after_data_but_accepted_is_resolved_by_the_acceptance() {
    within(90, async {
        let env = Env::start(
            1.0,
            Some("[smtp]\ndrop_after_data = \"accepted\"\ndrop_count = 1\n"),
        )
        .await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let subject = "Caduta dopo DATA, accettata";
        post(&gw, "caduta.toml", MARIO, subject);

        let d = wait_subject(&gw, subject, "delivered", Duration::from_secs(40)).await;
        let id = s(&d["dispatch_id"]).to_owned();
        let mid = s(&d["message_id"]).to_owned();
        assert!(d["identificativo"].is_string(), "{d}");

        // It was uncertain (the reply to DATA never came) until the signed
        // acceptance proved the provider had it.
        let events = events_of(&gw, &id);
        let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        let pos = |n: &str| {
            names
                .iter()
                .position(|e| *e == n)
                .unwrap_or_else(|| panic!("{n} missing: {names:?}"))
        };
        assert!(
            pos("dispatch.uncertain") < pos("dispatch.accepted")
                && pos("dispatch.accepted") < pos("dispatch.delivered"),
            "{names:?}"
        );
        assert!(
            gw.events("dispatch.uncertain")
                .iter()
                .any(|l| l["dispatch_id"] == id.as_str()),
            "dispatch.uncertain logged"
        );

        // Past the grace period and a sync: one attempt, proven by its
        // acceptance, never resent.
        tokio::time::sleep(GRACE + Duration::from_secs(2)).await;
        assert_eq!(
            attempts_of(&gw, &id),
            [(mid.clone(), "submitted".to_owned())],
            "one attempt, proven by the receipt"
        );
        assert!(gw.events("dispatch.grace_resend").is_empty());
        let boxes = mailboxes_exactly(&env, &[(MARIO, 1), (OFFICE, 2)]).await;
        assert_eq!(envelopes(&boxes[0], subject), 1, "reached mario once");
        assert_eq!(referring(&boxes[0], &Kind::Transport, &mid).len(), 1);
        assert_eq!(referring(&boxes[1], &Kind::Acceptance, &mid).len(), 1);

        // The timeline shows both receipts as valid, and they are filed.
        let t = show(&gw, &id).await;
        assert_eq!(t["state"], "delivered");
        let receipts: Vec<(&str, &str)> = t["receipts"]
            .as_array()
            .expect("receipts")
            .iter()
            .map(|r| (s(&r["kind"]), s(&r["verdict"])))
            .collect();
        assert_eq!(
            receipts,
            [("accettazione", "valid"), ("avvenuta-consegna", "valid")],
            "{t}"
        );
        let dir = PathBuf::from(s(&d["sent_dir"]));
        let filed = eventually("two receipts filed", Duration::from_secs(10), || {
            let f = filed_receipts(&dir);
            (f.len() == 2).then_some(f)
        })
        .await;
        assert!(filed[0].starts_with("01-accettazione"), "{filed:?}");
        assert!(filed[1].starts_with("02-avvenuta-consegna"), "{filed:?}");
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. Connection dropped after DATA, the provider discarded the letter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_after_data_and_discarded_is_resent_once_after_the_grace() {
    within(90, async {
        let env = Env::start(
            1.0,
            Some("[smtp]\ndrop_after_data = \"not-accepted\"\ndrop_count = 1\n"),
        )
        .await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let subject = "Caduta dopo DATA, scartata";
        post(&gw, "scartata.toml", GIULIA, subject);

        let d = wait_subject(&gw, subject, "uncertain", Duration::from_secs(30)).await;
        let id = s(&d["dispatch_id"]).to_owned();
        let first = s(&d["message_id"]).to_owned();
        let d = wait_state(&gw, &id, "delivered", Duration::from_secs(60)).await;
        let second = s(&d["message_id"]).to_owned();
        assert_ne!(first, second, "a new Message-ID");
        assert!(second.starts_with(&format!("{id}.2.")), "{second}");

        let detail = gw.db().get(&id).expect("get").expect("dispatch");
        let attempts: Vec<(&str, &str)> = detail
            .attempts
            .iter()
            .map(|a| (a.message_id.as_str(), a.state.as_str()))
            .collect();
        assert_eq!(
            attempts,
            [
                (first.as_str(), "uncertain"),
                (second.as_str(), "submitted")
            ],
            "two attempts"
        );
        // Not before the grace period had passed.
        let lost = detail.attempts[0].finished_at.expect("finished");
        let again = detail.attempts[1].started_at;
        let waited = again.duration_since(lost);
        assert!(
            waited
                >= jiff::SignedDuration::try_from(GRACE).unwrap()
                    - jiff::SignedDuration::from_secs(1),
            "resent {waited:?} after the attempt became uncertain"
        );
        let resends = gw.events("dispatch.grace_resend");
        assert_eq!(resends.len(), 1, "{resends:?}");
        assert_eq!(resends[0]["dispatch_id"], id.as_str());
        assert_eq!(resends[0]["level"], "WARN");
        let events = events_of(&gw, &id);
        assert!(
            events
                .iter()
                .any(|(e, c)| e == "dispatch.queued" && c == "timer.grace"),
            "{events:?}"
        );

        // Giulia got it exactly once, the second attempt; nothing carries the
        // first Message-ID.
        let boxes = mailboxes_exactly(&env, &[(GIULIA, 1), (OFFICE, 2)]).await;
        assert_eq!(envelopes(&boxes[0], subject), 1);
        assert_eq!(referring(&boxes[0], &Kind::Transport, &second).len(), 1);
        assert_eq!(referring(&boxes[1], &Kind::Acceptance, &second).len(), 1);
        assert_eq!(referring(&boxes[1], &Kind::Delivery, &second).len(), 1);
        for b in &boxes {
            assert!(
                b.iter()
                    .all(|m| m.refers_to.as_deref() != Some(first.as_str()))
            );
        }
        // And nothing more is sent.
        tokio::time::sleep(QUIET).await;
        assert_eq!(attempts_of(&gw, &id).len(), 2);
        assert_eq!(gw.events("dispatch.grace_resend").len(), 1);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. pecgate resolve while the daemon runs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_resend_and_mark_sent_while_the_daemon_runs() {
    within(90, async {
        let env = Env::start(
            1.0,
            Some("[smtp]\ndrop_after_data = \"not-accepted\"\ndrop_count = 2\n"),
        )
        .await;
        // A long grace: the letters stay uncertain until the operator decides.
        let vars = [("PECGATE__DEADLINES__UNCERTAIN_GRACE_MINUTES", "600")];
        let mut gw = Gateway::start_full(&env, &vars).await;
        let (sa, sb, sc) = (
            "Da rispedire",
            "Da dichiarare spedita",
            "Consegnata normalmente",
        );
        post(&gw, "a.toml", MARIO, sa);
        let a = wait_subject(&gw, sa, "uncertain", Duration::from_secs(30)).await;
        post(&gw, "b.toml", GIULIA, sb);
        let b = wait_subject(&gw, sb, "uncertain", Duration::from_secs(30)).await;
        post(&gw, "c.toml", LUCA, sc);
        let c = wait_subject(&gw, sc, "delivered", Duration::from_secs(30)).await;
        let (a_id, b_id, c_id) = (
            s(&a["dispatch_id"]).to_owned(),
            s(&b["dispatch_id"]).to_owned(),
            s(&c["dispatch_id"]).to_owned(),
        );
        let a_first = s(&a["message_id"]).to_owned();
        let b_mid = s(&b["message_id"]).to_owned();

        // --resend: the running daemon sends it again with a new Message-ID.
        let (code, text) = resolve(&gw, &a_id, "--resend").await;
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("queued"), "{text}");
        let a = wait_state(&gw, &a_id, "delivered", Duration::from_secs(30)).await;
        let a_second = s(&a["message_id"]).to_owned();
        assert_ne!(a_second, a_first);
        assert_eq!(
            attempts_of(&gw, &a_id),
            [
                (a_first.clone(), "uncertain".to_owned()),
                (a_second.clone(), "submitted".to_owned())
            ]
        );
        assert!(
            events_of(&gw, &a_id)
                .iter()
                .any(|(e, c)| e == "dispatch.queued" && c == "operator.resend"),
            "the decision is recorded with its cause"
        );

        // --mark-sent: recorded as submitted, never sent again.
        let (code, text) = resolve(&gw, &b_id, "--mark-sent").await;
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("submitted"), "{text}");
        // Longer than the sender's idle poll (5 s).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let b_now = gw.db().get(&b_id).expect("get").expect("dispatch");
        assert_eq!(b_now.dispatch.state, "submitted");
        assert_eq!(
            attempts_of(&gw, &b_id),
            [(b_mid.clone(), "submitted".to_owned())],
            "no new attempt"
        );
        assert!(
            events_of(&gw, &b_id)
                .iter()
                .any(|(e, c)| e == "dispatch.submitted" && c == "operator.mark_sent")
        );

        // Not applicable: a delivered letter, a letter already resent, an
        // unknown id. Exit 1, nothing changed.
        let before = (events_of(&gw, &c_id), attempts_of(&gw, &c_id));
        for flag in ["--resend", "--mark-sent"] {
            let (code, text) = resolve(&gw, &c_id, flag).await;
            assert_eq!(code, Some(1), "{flag} on a delivered letter: {text}");
            assert!(text.contains("not changed"), "{text}");
        }
        assert_eq!((events_of(&gw, &c_id), attempts_of(&gw, &c_id)), before);
        let (code, text) = resolve(&gw, &a_id, "--resend").await;
        assert_eq!(code, Some(1), "already resent and delivered: {text}");
        let (code, text) = resolve(&gw, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--resend").await;
        assert_eq!(code, Some(1), "unknown id: {text}");

        // What the recipients got: A once (second attempt), B never (the
        // provider had discarded it: the operator's call), C once.
        let boxes = mailboxes_exactly(&env, &[(MARIO, 1), (LUCA, 1)]).await;
        assert_eq!(envelopes(&boxes[0], sa), 1);
        assert_eq!(referring(&boxes[0], &Kind::Transport, &a_second).len(), 1);
        assert_eq!(envelopes(&boxes[1], sc), 1);
        assert!(mailbox(&env, GIULIA).await.is_empty());
        assert!(gw.events("dispatch.grace_resend").is_empty());
        let list = gw.list(Some("uncertain")).await;
        assert!(list.is_empty(), "{list:?}");
        // The operator's writes kept the event chain intact.
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Crash test, completed: every letter exactly once, none uncertain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_every_letter_is_delivered_exactly_once() {
    within(200, async {
        const LETTERS: usize = 150;
        let seed = test_seed();
        let mut rng = Rng::new(seed);
        let citizens = [ANAGRAFE, MARIO, GIULIA, LUCA];
        let recipient = |n: usize| citizens[n % citizens.len()];
        let subject = |n: usize| format!("Lettera {n}");
        let env = Env::start(1.0, None).await;
        let vars = [("PECGATE__MAILBOX__PROTOCOLLO__PACE__PER_MINUTE", "100000")];
        let mut gw = Gateway::start_full(&env, &vars).await;
        let outbox = gw.outbox();
        drop_numbered_letters(&outbox, LETTERS, recipient);

        // SIGKILLed at random moments (sending, receiving, both), restarted
        // each time.
        let kills = rng.range(6, 10);
        let started = Instant::now();
        let mut runs_started = 0;
        for k in 1..=kills {
            let delay = Duration::from_millis(rng.range(150, 1500));
            tokio::time::sleep(delay).await;
            gw.kill();
            let counts = gw.db().state_counts().expect("state counts");
            eprintln!(
                "kill {k}/{kills} (seed {seed:#x}) after {delay:?}: states {:?}",
                counts
                    .iter()
                    .map(|c| format!("{}={}", c.state, c.count))
                    .collect::<Vec<_>>()
            );
            runs_started = gw.events("daemon.started").len();
            gw.spawn();
        }
        // (A run killed during start-up never logged daemon.started: wait
        // for the last run's own line.)
        eventually("the last run started", Duration::from_secs(30), || {
            (gw.events("daemon.started").len() > runs_started).then_some(())
        })
        .await;

        // Left to run: every letter ends delivered, none uncertain.
        gw.wait_list("every letter delivered", Duration::from_secs(150), |l| {
            l.len() == LETTERS && l.iter().all(|d| d["state"] == "delivered")
        })
        .await;
        eprintln!(
            "all delivered {:?} after the letters were dropped",
            started.elapsed()
        );
        assert!(gw.list(Some("uncertain")).await.is_empty());

        // What each recipient got: every letter exactly once.
        for a in citizens {
            let n = (1..=LETTERS).filter(|n| recipient(*n) == a).count();
            sandbox_support::wait_for(&env.info, a, n, Duration::from_secs(30)).await;
        }
        sandbox_support::wait_for(&env.info, OFFICE, 2 * LETTERS, Duration::from_secs(30)).await;
        tokio::time::sleep(QUIET).await;
        let mut got: HashMap<&str, Vec<Sys>> = HashMap::new();
        for a in citizens {
            got.insert(a, mailbox(&env, a).await);
        }
        let office = mailbox(&env, OFFICE).await;
        let db = gw.db();
        let (mut resent, mut proven) = (0, 0);
        for n in 1..=LETTERS {
            let list = &got[recipient(n)];
            assert_eq!(
                envelopes(list, &subject(n)),
                1,
                "letter {n} reached {} exactly once",
                recipient(n)
            );
        }
        let dispatches = all_dispatches(&db);
        assert_eq!(dispatches.len(), LETTERS, "one dispatch per letter");
        for d in &dispatches {
            let id = &d.dispatch.id;
            let states: Vec<&str> = d.attempts.iter().map(|a| a.state.as_str()).collect();
            assert_eq!(
                states.iter().filter(|s| **s == "submitted").count(),
                1,
                "{id}: exactly one attempt reached the provider: {states:?}"
            );
            assert!(
                states
                    .iter()
                    .all(|s| *s == "submitted" || *s == "uncertain" || *s == "failed-transient"),
                "{id}: {states:?}"
            );
            let delivered = d
                .attempts
                .iter()
                .find(|a| a.state == "submitted")
                .expect("submitted");
            let inbox = &got[d.recipients[0].address.as_str()];
            assert_eq!(
                referring(inbox, &Kind::Transport, &delivered.message_id).len(),
                1,
                "{id}: delivered with the proven attempt's Message-ID"
            );
            let accepted: usize = d
                .attempts
                .iter()
                .map(|a| referring(&office, &Kind::Acceptance, &a.message_id).len())
                .sum();
            assert_eq!(accepted, 1, "{id}: one acceptance");
            let events: Vec<(String, String)> = db
                .events_for(id)
                .expect("events")
                .into_iter()
                .map(|e| (e.event, e.cause))
                .collect();
            if d.attempts.iter().any(|a| a.state == "uncertain") {
                // Resent by the grace rule: the provider never had the
                // uncertain attempt.
                resent += 1;
                assert!(
                    events
                        .iter()
                        .any(|(e, c)| e == "dispatch.queued" && c == "timer.grace"),
                    "{id}: {events:?}"
                );
                for a in d.attempts.iter().filter(|a| a.state == "uncertain") {
                    assert!(
                        inbox
                            .iter()
                            .chain(&office)
                            .all(|m| m.refers_to.as_deref() != Some(a.message_id.as_str())),
                        "{id}: the uncertain attempt {} never reached the provider",
                        a.message_id
                    );
                }
            } else if events.iter().any(|(e, _)| e == "dispatch.uncertain") {
                // Uncertain, then proven sent by its acceptance.
                proven += 1;
            }
        }
        eprintln!(
            "seed {seed:#x}: {kills} kills; {resent} letters resent by the grace rule, \
             {proven} uncertain ones resolved by their acceptance"
        );
        drop(db);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. Dovecot restarted during IDLE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_restarted_during_idle_nothing_is_missed() {
    within(90, async {
        const N: usize = 8;
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        gw.wait_log("imap connected", Duration::from_secs(20), |l| {
            l["event"] == "mailbox.connected"
        })
        .await;
        // Idling now; Dovecot goes away under the session.
        tokio::time::sleep(Duration::from_secs(1)).await;
        env.sandbox()
            .restart_dovecot()
            .await
            .expect("restart dovecot");
        // Letters sent while the gateway reconnects, and a second restart
        // while their receipts arrive.
        let citizens = [MARIO, GIULIA, LUCA, ANAGRAFE];
        for n in 1..=N {
            post(
                &gw,
                &format!("l{n}.toml"),
                citizens[n % 4],
                &format!("Durante il riavvio {n}"),
            );
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        env.sandbox()
            .restart_dovecot()
            .await
            .expect("restart dovecot");

        let list = gw
            .wait_list("every letter delivered", Duration::from_secs(60), |l| {
                l.len() == N && l.iter().all(|d| d["state"] == "delivered")
            })
            .await;
        assert!(
            !gw.events("mailbox.disconnected").is_empty(),
            "the lost session is logged"
        );
        assert!(gw.events("mailbox.connected").len() >= 2, "reconnected");

        // Every message of the office mailbox was taken in, and every
        // receipt applied.
        let office = env.fetch(OFFICE).await;
        assert_eq!(office.len(), 2 * N);
        let db = gw.db();
        for m in &office {
            let sha = sha256_hex(&m.raw);
            assert!(
                db.message(&sha).expect("message").is_some(),
                "uid {} ({}) not taken in",
                m.uid,
                sandbox_support::describe(&m.raw)
            );
        }
        for d in &list {
            let id = s(&d["dispatch_id"]);
            let receipts = db.receipts_for(id).expect("receipts");
            assert_eq!(receipts.len(), 2, "{id}: acceptance and delivery");
            let dir = PathBuf::from(s(&d["sent_dir"]));
            assert_eq!(filed_receipts(&dir).len(), 2, "{id}: filed");
        }
        drop(db);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. UIDVALIDITY changed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_resyncs_and_applies_nothing_twice() {
    within(90, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        post(&gw, "u1.toml", MARIO, "Prima del cambio 1");
        post(&gw, "u2.toml", GIULIA, "Prima del cambio 2");
        let list = gw
            .wait_list("both delivered", Duration::from_secs(40), |l| {
                l.len() == 2 && l.iter().all(|d| d["state"] == "delivered")
            })
            .await;
        let state = eventually(
            "cursor past the 4 receipts",
            Duration::from_secs(15),
            || {
                let st = gw.db().mailbox_state(MAILBOX).ok()??;
                (st.last_uid >= Some(4) && st.uidvalidity.is_some()).then_some(st)
            },
        )
        .await;
        let old = state.uidvalidity.expect("uidvalidity");

        // What must not change.
        let snapshot = |gw: &Gateway| {
            let db = gw.db();
            let per_letter: Vec<(usize, usize, Vec<String>)> = list
                .iter()
                .map(|d| {
                    let id = s(&d["dispatch_id"]);
                    (
                        db.events_for(id).expect("events").len(),
                        db.receipts_for(id).expect("receipts").len(),
                        filed_receipts(Path::new(s(&d["sent_dir"]))),
                    )
                })
                .collect();
            let logged: Vec<usize> = ["receipt.accepted", "receipt.delivered", "dispatch.final"]
                .iter()
                .map(|e| gw.events(e).len())
                .collect();
            (
                per_letter,
                logged,
                files_under(&gw.dir.join("archive")).len(),
            )
        };
        let before = snapshot(&gw);
        assert_eq!(before.1, [2, 2, 2], "two letters, two receipts each");

        // The server rebuilds the mailbox: same messages, new UIDVALIDITY.
        let new = old.wrapping_add(1000).max(1);
        let changed_at = jiff::Timestamp::now();
        set_office_uidvalidity(&env, new);
        gw.wait_log(
            "mailbox.uidvalidity_changed",
            Duration::from_secs(20),
            |l| {
                l["event"] == "mailbox.uidvalidity_changed"
                    && l["old"] == old
                    && l["new"] == new
                    && l["level"] == "WARN"
            },
        )
        .await;
        // A full resync under the new UIDVALIDITY, completed.
        eventually(
            "resynced under the new uidvalidity",
            Duration::from_secs(20),
            || {
                let st = gw.db().mailbox_state(MAILBOX).ok()??;
                (st.uidvalidity == Some(new)
                    && st.last_uid >= Some(4)
                    && st.last_sync_at.is_some_and(|t| t > changed_at))
                .then_some(())
            },
        )
        .await;
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            snapshot(&gw),
            before,
            "the re-fetched receipts are recognised: no state change, no second file"
        );

        // New receipts are still applied.
        post(&gw, "u3.toml", LUCA, "Dopo il cambio");
        let d = wait_subject(&gw, "Dopo il cambio", "delivered", Duration::from_secs(30)).await;
        let id = s(&d["dispatch_id"]);
        assert_eq!(gw.db().receipts_for(id).expect("receipts").len(), 2);
        let dir = PathBuf::from(s(&d["sent_dir"]));
        let filed = eventually("filed", Duration::from_secs(10), || {
            let f = filed_receipts(&dir);
            (f.len() == 2).then_some(f)
        })
        .await;
        assert_eq!(filed.len(), 2);
        assert_eq!(
            gw.db()
                .mailbox_state(MAILBOX)
                .expect("state")
                .expect("row")
                .uidvalidity,
            Some(new)
        );
        assert_eq!(gw.events("mailbox.uidvalidity_changed").len(), 1);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 7. Webmail flags untouched

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webmail_flags_are_left_as_people_set_them() {
    within(90, async {
        let env = Env::start(1.0, None).await;
        // Two messages in the office mailbox before the gateway runs: a
        // certified letter from a citizen and an ordinary one (anomaly).
        env.send(MARIO, &Letter::new(MARIO, &[OFFICE], "Istanza di accesso"))
            .await
            .expect("submission");
        env.send(ANNA, &Letter::new(ANNA, &[OFFICE], "Domanda informale"))
            .await
            .expect("submission");
        env.wait(OFFICE, 2).await;
        // A clerk reads the first in webmail and flags it.
        {
            let mut s = imap_login(&env.info, OFFICE).await.expect("login");
            s.select("INBOX").await.expect("SELECT");
            let _: Vec<_> = s
                .uid_store("1", "+FLAGS (\\Seen \\Flagged)")
                .await
                .expect("STORE")
                .try_collect()
                .await
                .expect("STORE");
            let _ = s.logout().await;
        }
        let before = office_flags(&env, "INBOX").await;
        assert_eq!(before.len(), 2);

        let mut gw = Gateway::start_full(&env, &[]).await;
        post(&gw, "f.toml", GIULIA, "Lettera con ricevute");
        wait_subject(
            &gw,
            "Lettera con ricevute",
            "delivered",
            Duration::from_secs(40),
        )
        .await;
        eventually(
            "both incoming messages unpacked",
            Duration::from_secs(20),
            || {
                let n = files_under(&gw.dir.join("inbox"))
                    .iter()
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            n == "messaggio-firmato.eml" || n == "busta-anomalia.eml"
                        })
                    })
                    .count();
                (n == 2).then_some(())
            },
        )
        .await;
        // A restart re-reads the mailbox state; still nothing is touched.
        gw.stop_cleanly().await;
        gw.spawn();
        gw.ready().await;
        tokio::time::sleep(QUIET).await;

        let flags = office_flags(&env, "INBOX").await;
        assert_eq!(flags.len(), 4, "nothing deleted: {flags:?}");
        assert_eq!(&flags[..1], &before[..1], "the clerk's flags are kept");
        for (uid, f) in &flags {
            assert!(!f.iter().any(|x| x.contains("Deleted")), "uid {uid}: {f:?}");
            if *uid != 1 {
                assert!(
                    !f.iter().any(|x| x.contains("Seen")),
                    "uid {uid} marked read by pecgate: {f:?}"
                );
            }
        }
        assert!(before[0].1.iter().any(|x| x.contains("Seen")));
        assert!(before[0].1.iter().any(|x| x.contains("Flagged")));
        // No folder was created either.
        let mut s = imap_login(&env.info, OFFICE).await.expect("login");
        let names: Vec<String> = s
            .list(None, Some("*"))
            .await
            .expect("LIST")
            .try_collect::<Vec<_>>()
            .await
            .expect("LIST")
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        let _ = s.logout().await;
        assert_eq!(names, ["INBOX"]);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 8. Incoming certified mail with hostile attachment names; anomalies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_mail_is_unpacked_safely_and_anomalies_are_marked() {
    within(90, async {
        let env = Env::start(1.0, None).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let long_name = format!("{}.pdf", "n".repeat(296));
        assert_eq!(long_name.len(), 300);
        let hostile: Vec<(&str, Vec<u8>)> = vec![
            ("../../etc/passwd", b"root:x:0:0:not really\n".to_vec()),
            ("a\u{0007}b.pdf", b"%PDF-1.4 bell\n".to_vec()),
            ("CON", b"device name\n".to_vec()),
            (long_name.as_str(), b"%PDF-1.4 long name\n".to_vec()),
            ("stesso-nome.pdf", b"%PDF-1.4 primo\n".to_vec()),
            ("stesso-nome.pdf", b"%PDF-1.4 secondo\n".to_vec()),
        ];
        let mut letter = Letter::new(MARIO, &[OFFICE], "Istanza con allegati");
        for (name, data) in &hostile {
            letter = letter.attach(Attachment {
                name: (*name).to_owned(),
                content_type: "application/octet-stream".into(),
                data: data.clone(),
            });
        }
        env.send(MARIO, &letter).await.expect("submission");
        let anomaly = Letter::new(ANNA, &[OFFICE], "Messaggio da casella ordinaria");
        env.send(ANNA, &anomaly).await.expect("submission");

        // What the office mailbox received.
        let office = env.wait(OFFICE, 2).await;
        let envelope = office
            .iter()
            .map(|f| env.certified(f))
            .find(|m| m.kind == Kind::Transport)
            .expect("the transport envelope");
        let d = envelope.d().clone();

        eventually("two messages received", Duration::from_secs(30), || {
            (gw.events("message.received").len() >= 2).then_some(())
        })
        .await;
        let received = gw.events("message.received");
        assert_eq!(received.len(), 2, "{received:?}");
        let certified = received
            .iter()
            .find(|l| l["identificativo"] == d.identificativo.as_str())
            .unwrap_or_else(|| panic!("a message.received for the envelope: {received:?}"));
        let folder = PathBuf::from(s(&certified["path"]));

        // inbox/YYYY/MM/<identificativo>/, month of the certified time in Rome.
        let local = d
            .data
            .to_zoned_datetime(jiff::tz::TimeZone::get("Europe/Rome").unwrap());
        let want = gw
            .dir
            .join("inbox")
            .join(format!("{:04}", local.year()))
            .join(format!("{:02}", local.month()))
            .join(&d.identificativo);
        assert_eq!(folder, want);
        let names = entries(&folder);
        for fixed in [
            "messaggio-firmato.eml",
            "postacert.eml",
            "daticert.xml",
            "verifica.txt",
        ] {
            assert!(names.iter().any(|n| n == fixed), "{fixed} in {names:?}");
        }
        assert_eq!(
            fs::read(folder.join("messaggio-firmato.eml")).unwrap(),
            envelope.raw,
            "the signed message as received"
        );
        assert_eq!(
            fs::read(folder.join("postacert.eml")).unwrap(),
            envelope.postacert.clone().unwrap()
        );
        let report = fs::read_to_string(folder.join("verifica.txt")).unwrap();
        assert!(
            report.contains("VALIDA / VALID") && !report.contains("NON VALIDA"),
            "{report}"
        );
        assert!(report.contains(&d.identificativo), "{report}");

        // The attachments: each exactly once, under a safe name, in the folder.
        let attached: Vec<&String> = names
            .iter()
            .filter(|n| {
                ![
                    "messaggio-firmato.eml",
                    "postacert.eml",
                    "daticert.xml",
                    "verifica.txt",
                ]
                .contains(&n.as_str())
            })
            .collect();
        assert_eq!(attached.len(), hostile.len(), "{attached:?}");
        let mut seen: HashSet<String> = HashSet::new();
        for n in &attached {
            let p = folder.join(n);
            assert!(p.is_file(), "{n}: a plain file");
            assert!(n.len() <= 150, "{n}: {} bytes", n.len());
            assert!(!n.chars().any(char::is_control), "{n:?}: control character");
            assert!(
                !n.starts_with('.') && !n.contains('/') && !n.contains('\\'),
                "{n:?}"
            );
            assert!(seen.insert(n.to_lowercase()), "{n}: twice");
        }
        for (name, data) in &hostile {
            let holders: Vec<&&String> = attached
                .iter()
                .filter(|n| fs::read(folder.join(n)).is_ok_and(|b| b == *data))
                .collect();
            assert_eq!(
                holders.len(),
                1,
                "{name:?}: kept exactly once ({holders:?})"
            );
        }
        assert!(attached.iter().any(|n| *n == "passwd"), "{attached:?}");
        assert!(attached.iter().any(|n| *n == "_CON"), "{attached:?}");
        assert!(
            attached.iter().any(|n| *n == "stesso-nome.pdf"),
            "{attached:?}"
        );
        assert!(
            attached
                .iter()
                .any(|n| n.ends_with(".pdf") && n.starts_with("nnnn"))
        );

        // Nothing escaped the folder.
        let anomaly_folder = eventually("the anomaly folder", Duration::from_secs(20), || {
            received
                .iter()
                .find(|l| l["identificativo"].is_null())
                .map(|l| PathBuf::from(s(&l["path"])))
        })
        .await;
        for p in files_under(&gw.dir.join("inbox")) {
            assert!(
                p.starts_with(&folder) || p.starts_with(&anomaly_folder),
                "file outside the message folders: {}",
                p.display()
            );
        }
        for p in files_under(env.tmp.path()) {
            if p.file_name().is_some_and(|n| n == "passwd") {
                assert_eq!(p.parent(), Some(folder.as_path()), "{}", p.display());
            }
        }
        let db = gw.db();
        let row = db
            .incoming(&sha256_hex(&envelope.raw))
            .expect("incoming")
            .expect("recorded");
        assert_eq!(
            row.identificativo.as_deref(),
            Some(d.identificativo.as_str())
        );
        assert_eq!(row.folder.as_deref(), Some(folder.to_str().unwrap()));

        // The ordinary sender's message: an anomaly folder, marked not certified.
        let base = anomaly_folder
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(base.starts_with("anomalia-"), "{base}");
        assert_eq!(anomaly_folder.parent(), folder.parent(), "same month");
        let anames = entries(&anomaly_folder);
        assert_eq!(
            anames,
            [
                "NON-CERTIFICATO.txt",
                "busta-anomalia.eml",
                "messaggio-non-certificato.eml"
            ]
        );
        let notice = fs::read_to_string(anomaly_folder.join("NON-CERTIFICATO.txt")).unwrap();
        assert!(
            notice.contains("NON CERTIFICATO") && notice.contains("Messaggio da casella ordinaria"),
            "{notice}"
        );
        let wrapped = fs::read(anomaly_folder.join("messaggio-non-certificato.eml")).unwrap();
        assert_eq!(
            sandbox_support::header(&wrapped, "From").as_deref(),
            Some(ANNA),
            "the clerk can see who really wrote"
        );
        assert_eq!(
            sandbox_support::header(&wrapped, "Message-ID"),
            Some(format!("<{}>", anomaly.message_id))
        );
        let aline = received
            .iter()
            .find(|l| l["identificativo"].is_null())
            .expect("anomaly logged");
        assert_eq!(aline["level"], "WARN");
        let raw_anomaly = fs::read(anomaly_folder.join("busta-anomalia.eml")).unwrap();
        let arow = db
            .incoming(&sha256_hex(&raw_anomaly))
            .expect("incoming")
            .expect("recorded");
        assert_eq!(arow.identificativo, None);
        assert!(
            arow.oggetto
                .as_deref()
                .unwrap_or_default()
                .contains("non certificato"),
            "{arow:?}"
        );
        drop(db);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 9. Retention

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_moves_processed_messages_only() {
    within(90, async {
        let env = Env::start(1.0, None).await;
        // The test's copy of pecgate.toml: retention after one day (the
        // least the configuration accepts), IDLE re-issued every second so
        // that retention runs every 10 s.
        let config = env.dir().join("pecgate.toml");
        let text = fs::read_to_string(&config).unwrap();
        let text = text.replace("poll_seconds = 5 }", "poll_seconds = 1 }");
        assert!(text.contains("poll_seconds = 1 }"), "{text}");
        fs::write(
            &config,
            format!(
                "{text}retention = {{ after_days = 1, action = \"move\", folder = \"Archivio\" }}\n"
            ),
        )
        .unwrap();
        let vars = [("PECGATE__MAILBOX__PROTOCOLLO__IMAP__READ_ONLY", "false")];
        let mut gw = Gateway::start_full(&env, &vars).await;
        post(&gw, "r1.toml", MARIO, "Da archiviare 1");
        post(&gw, "r2.toml", GIULIA, "Da archiviare 2");
        gw.wait_list("both delivered", Duration::from_secs(40), |l| {
            l.len() == 2 && l.iter().all(|d| d["state"] == "delivered")
        })
        .await;
        eventually(
            "cursor past the 4 receipts",
            Duration::from_secs(15),
            || {
                let st = gw.db().mailbox_state(MAILBOX).ok()??;
                (st.last_uid >= Some(4)).then_some(())
            },
        )
        .await;
        gw.stop_cleanly().await;
        let receipts = office_folder(&env, "INBOX").await;
        assert_eq!(receipts.len(), 4);
        assert!(gw.events("mailbox.retention").is_empty(), "nothing old yet");

        // Two days pass (the store's record times are moved back), and
        // while the gateway is down a citizen writes to the office.
        let db_path = gw.dir.join("pecgate.db");
        {
            let conn = rusqlite::Connection::open(&db_path).expect("open the store");
            let two_days_ago = jiff::Timestamp::now()
                .checked_sub(jiff::SignedDuration::from_hours(48))
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            let n = conn
                .execute(
                    "UPDATE messages SET recorded_at = ?1 WHERE direction = 'in'",
                    [&two_days_ago],
                )
                .expect("backdate");
            assert_eq!(n, 4);
        }
        env.send(
            MARIO,
            &Letter::new(MARIO, &[OFFICE], "Arrivata a gateway fermo"),
        )
        .await
        .expect("submission");
        env.wait(OFFICE, 5).await;
        let newcomer = office_folder(&env, "INBOX")
            .await
            .pop()
            .expect("the new message");
        assert!(!receipts.contains(&newcomer));

        gw.spawn();
        gw.ready().await;
        gw.wait_log("retention pass", Duration::from_secs(30), |l| {
            l["event"] == "mailbox.retention" && l["count"] == 4
        })
        .await;
        tokio::time::sleep(QUIET).await;

        // On the server: the four processed, old messages moved, intact;
        // the new one still in INBOX (and unpacked for the clerks).
        let inbox = office_folder(&env, "INBOX").await;
        assert_eq!(
            inbox,
            std::slice::from_ref(&newcomer),
            "only the new message stays"
        );
        let mut archived = office_folder(&env, "Archivio").await;
        let mut want = receipts.clone();
        archived.sort();
        want.sort();
        assert_eq!(archived, want, "moved, byte for byte");
        assert!(
            files_under(&gw.dir.join("inbox"))
                .iter()
                .any(|p| p.ends_with("messaggio-firmato.eml")),
            "the new message was processed"
        );
        // The store marks exactly the moved ones.
        let conn = rusqlite::Connection::open(&db_path).expect("open the store");
        let mut stmt = conn
            .prepare("SELECT sha256, retained_at FROM messages WHERE direction = 'in'")
            .unwrap();
        let rows: Vec<(String, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let moved: HashSet<String> = receipts.iter().map(|r| sha256_hex(r)).collect();
        assert_eq!(rows.len(), 5);
        for (sha, retained) in &rows {
            assert_eq!(
                retained.is_some(),
                moved.contains(sha),
                "{sha}: retained_at {retained:?}"
            );
        }
        drop(stmt);
        drop(conn);
        // Nothing more to do on the next pass.
        assert_eq!(gw.events("mailbox.retention").len(), 1);
        gw.stop_cleanly().await;
        env.shutdown().await;
    })
    .await;
}
