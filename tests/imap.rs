//! The IMAP edge (`pecgate::imap`) against a real sandbox Dovecot: sync by
//! UID with exact bytes, the `n:*` edge, no `\Seen`, UIDVALIDITY changes,
//! quota, IDLE, reconnection after a Dovecot restart, handler failures,
//! refused logins, STARTTLS and retention.

mod sandbox_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use pecgate::config::{Config, ImapConfig, RetentionAction, Secret, TlsMode};
use pecgate::imap::{self, Cursor, ImapError, SyncEvent};
use sandbox_support::{Env, OFFICE, imap_login, within};
use tokio_util::sync::CancellationToken;

/// The office mailbox's IMAP settings from the sandbox's `pecgate.toml`.
fn office_imap(env: &Env) -> ImapConfig {
    let cfg = Config::load_with_env(&env.dir().join("pecgate.toml"), Vec::new())
        .expect("sandbox pecgate.toml loads");
    let mut imap = cfg
        .mailbox("protocollo")
        .expect("mailbox protocollo")
        .imap
        .clone();
    imap.server.timeout = Duration::from_secs(10);
    imap
}

/// A distinct little message (CRLF, a non-ASCII byte to check exactness).
fn message(tag: &str) -> Vec<u8> {
    format!(
        "From: a@example.test\r\nTo: {OFFICE}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@test.invalid>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCorpo {tag} \u{e8}.\r\n"
    )
    .into_bytes()
}

/// APPENDs these messages to the office INBOX from a separate session.
async fn append(env: &Env, msgs: &[Vec<u8>]) {
    let mut s = imap_login(&env.info, OFFICE).await.expect("fixture login");
    for m in msgs {
        s.append("INBOX", None, None, m).await.expect("APPEND");
    }
    let _ = s.logout().await;
}

/// The flags of every message of the office INBOX, by UID.
async fn flags(env: &Env) -> Vec<(u32, Vec<String>)> {
    let mut s = imap_login(&env.info, OFFICE).await.expect("login");
    s.examine("INBOX").await.expect("EXAMINE");
    let f: Vec<_> = s
        .uid_fetch("1:*", "(UID FLAGS)")
        .await
        .expect("FETCH")
        .try_collect()
        .await
        .expect("FETCH stream");
    let mut out: Vec<(u32, Vec<String>)> = f
        .iter()
        .map(|f| {
            (
                f.uid.expect("uid"),
                f.flags().map(|fl| format!("{fl:?}")).collect(),
            )
        })
        .collect();
    out.sort();
    let _ = s.logout().await;
    out
}

/// One `sync_once` collecting every event.
async fn sync(session: &mut imap::Session, cursor: &mut Cursor, batch: usize) -> Vec<SyncEvent> {
    let mut events = Vec::new();
    imap::sync_once(session, "INBOX", cursor, true, batch, &mut |ev| {
        events.push(ev);
        async { Ok(()) }
    })
    .await
    .expect("sync_once");
    events
}

fn messages(events: &[SyncEvent]) -> Vec<(u32, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            SyncEvent::Message(f) => Some((f.uid, f.bytes.clone())),
            _ => None,
        })
        .collect()
}

fn synced(events: &[SyncEvent]) -> (u32, u32) {
    match events.last() {
        Some(SyncEvent::Synced {
            uidvalidity,
            last_uid,
            ..
        }) => (*uidvalidity, *last_uid),
        other => panic!("last event is not Synced: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_by_uid_exact_bytes_no_seen_quota() {
    let env = Env::start(1.0, None).await;
    within(40, async {
        let cfg = office_imap(&env);
        let first: Vec<Vec<u8>> = (1..=3).map(|i| message(&format!("m{i}"))).collect();
        append(&env, &first).await;
        let before = flags(&env).await;
        assert!(before.iter().all(|(_, f)| f.iter().all(|x| x != "Seen")));

        let mut s = imap::connect(&cfg).await.expect("connect");
        assert!(s.has_idle() && s.has_quota(), "{s:?}");

        // Empty cursor: everything, in UID order, byte for byte (batch 2
        // splits the fetch).
        let mut cursor = Cursor::default();
        let ev = sync(&mut s, &mut cursor, 2).await;
        let got = messages(&ev);
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        for (m, want) in got.iter().zip(&first) {
            assert_eq!(&m.1, want, "uid {}: bytes differ", m.0);
        }
        assert!(
            !ev.iter()
                .any(|e| matches!(e, SyncEvent::UidValidityChanged { .. })),
            "first sync adopts UIDVALIDITY silently"
        );
        let quota = ev.iter().find_map(|e| match e {
            SyncEvent::Quota { used, limit } => Some((*used, *limit)),
            _ => None,
        });
        let (used, limit) = quota.expect("Quota event (Dovecot has a 1G quota)");
        assert_eq!(limit, 1024 * 1024 * 1024);
        assert!(used > 0 && used < limit, "used {used}");
        let (uv, last) = synced(&ev);
        assert_eq!(last, 3);
        assert_eq!(
            cursor,
            Cursor {
                uidvalidity: Some(uv),
                last_uid: Some(3)
            }
        );

        // Read-only: no \Seen, nothing else changed.
        assert_eq!(flags(&env).await, before, "flags changed by the sync");

        // Cursor at the highest UID: `4:*` returns UID 3, which must not
        // come again.
        let ev = sync(&mut s, &mut cursor, 2).await;
        assert!(messages(&ev).is_empty(), "{ev:?}");
        assert_eq!(synced(&ev), (uv, 3));

        // Incremental: only the new ones.
        let more: Vec<Vec<u8>> = (4..=5).map(|i| message(&format!("m{i}"))).collect();
        append(&env, &more).await;
        let ev = sync(&mut s, &mut cursor, 10).await;
        assert_eq!(
            messages(&ev),
            vec![(4, more[0].clone()), (5, more[1].clone())]
        );
        assert_eq!(cursor.last_uid, Some(5));
        assert!(
            flags(&env)
                .await
                .iter()
                .all(|(_, f)| f.iter().all(|x| x != "Seen"))
        );
        s.logout().await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_gives_full_resync() {
    let env = Env::start(1.0, None).await;
    within(40, async {
        let cfg = office_imap(&env);
        let msgs: Vec<Vec<u8>> = (1..=2).map(|i| message(&format!("v{i}"))).collect();
        append(&env, &msgs).await;
        let mut s = imap::connect(&cfg).await.expect("connect");
        let mut cursor = Cursor::default();
        let ev = sync(&mut s, &mut cursor, 10).await;
        let (old, _) = synced(&ev);
        s.logout().await;

        let new = old.wrapping_add(1000);
        let doveadm = sandbox_support::find_program("doveadm").expect("doveadm installed");
        let conf = env.dir().join("dovecot").join("dovecot.conf");
        let out = std::process::Command::new(doveadm)
            .arg("-c")
            .arg(&conf)
            .args(["mailbox", "update", "-u", OFFICE, "--uid-validity"])
            .arg(new.to_string())
            .arg("INBOX")
            .output()
            .expect("run doveadm");
        assert!(out.status.success(), "doveadm: {}", String::from_utf8_lossy(&out.stderr));

        let mut s = imap::connect(&cfg).await.expect("reconnect");
        let ev = sync(&mut s, &mut cursor, 10).await;
        assert_eq!(ev[0], SyncEvent::UidValidityChanged { old, new });
        let got = messages(&ev);
        assert_eq!(got.iter().map(|m| m.1.clone()).collect::<Vec<_>>(), msgs);
        assert!(got.iter().all(|m| matches!(ev.iter().find(|e| matches!(e, SyncEvent::Message(f) if f.uid == m.0)), Some(SyncEvent::Message(f)) if f.uidvalidity == new)));
        assert_eq!(synced(&ev).0, new);
        assert_eq!(cursor.uidvalidity, Some(new));
        s.logout().await;
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_auth_and_starttls_works() {
    let env = Env::start(1.0, None).await;
    within(30, async {
        let mut cfg = office_imap(&env);
        cfg.server.password = Secret::new("not-the-password");
        let err = imap::connect(&cfg).await.expect_err("login must fail");
        assert!(err.is_auth() && !err.is_transient(), "{err:?}");

        let mut cfg = office_imap(&env);
        cfg.server.tls = TlsMode::StartTls;
        cfg.server.port = env.info.imap.port;
        let s = imap::connect(&cfg).await.expect("STARTTLS connect");
        s.logout().await;

        // Nothing listening: transient, not auth.
        let mut cfg = office_imap(&env);
        cfg.server.port = pecgate::sandbox::dovecot::free_port().expect("free port");
        let err = imap::connect(&cfg).await.expect_err("no server");
        assert!(!err.is_auth() && err.is_transient(), "{err:?}");
    })
    .await;
    env.shutdown().await;
}

/// What a `run` handler saw: (uid, bytes) of each message, in order.
type Seen = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

async fn wait_until(
    seen: &Seen,
    what: &str,
    limit: Duration,
    ok: impl Fn(&[(u32, Vec<u8>)]) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        {
            let s = seen.lock().unwrap();
            if ok(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; handler saw uids {:?}",
                s.iter().map(|m| m.0).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_idles_and_survives_a_dovecot_restart() {
    // Logs show in the output of a failing run.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let env = Env::start(1.0, None).await;
    within(45, async {
        let cfg = office_imap(&env);
        assert!(cfg.idle);
        let seen: Seen = Arc::default();
        let cancel = CancellationToken::new();
        let task = {
            let (seen, cancel) = (seen.clone(), cancel.clone());
            tokio::spawn(async move {
                imap::run(
                    "protocollo",
                    cfg,
                    Cursor::default(),
                    move |ev| {
                        if let SyncEvent::Message(f) = ev {
                            seen.lock().unwrap().push((f.uid, f.bytes));
                        }
                        async { Ok(()) }
                    },
                    cancel,
                )
                .await
            })
        };
        // Let run connect and enter IDLE on the empty mailbox.
        tokio::time::sleep(Duration::from_millis(700)).await;

        let m1 = message("idle1");
        let t = Instant::now();
        append(&env, std::slice::from_ref(&m1)).await;
        wait_until(
            &seen,
            "message appended while idling",
            Duration::from_secs(3),
            |s| s.len() == 1,
        )
        .await;
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(seen.lock().unwrap()[0], (1, m1.clone()));

        // Dovecot restarts under the IDLE; a message arrives right after,
        // while run is still reconnecting.
        env.sandbox()
            .restart_dovecot()
            .await
            .expect("restart dovecot");
        let m2 = message("after-restart");
        append(&env, std::slice::from_ref(&m2)).await;
        wait_until(
            &seen,
            "message appended during the restart",
            Duration::from_secs(10),
            |s| s.len() == 2,
        )
        .await;

        cancel.cancel();
        let cursor = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run stops on cancel")
            .expect("run task");
        assert_eq!(cursor.last_uid, Some(2));
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            vec![(1, m1), (2, m2)],
            "nothing missed, nothing twice"
        );
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_handler_failure_keeps_the_cursor() {
    let env = Env::start(1.0, None).await;
    within(40, async {
        let cfg = office_imap(&env);
        let msgs: Vec<Vec<u8>> = (1..=3).map(|i| message(&format!("h{i}"))).collect();
        append(&env, &msgs).await;
        let seen: Seen = Arc::default();
        let cancel = CancellationToken::new();
        let task = {
            let (seen, cancel) = (seen.clone(), cancel.clone());
            let mut failed_once = false;
            tokio::spawn(async move {
                imap::run(
                    "protocollo",
                    cfg,
                    Cursor::default(),
                    move |ev| {
                        let mut result = Ok(());
                        if let SyncEvent::Message(f) = ev {
                            seen.lock().unwrap().push((f.uid, f.bytes));
                            if f.uid == 2 && !failed_once {
                                failed_once = true;
                                result = Err("disk full".to_owned());
                            }
                        }
                        async move { result }
                    },
                    cancel,
                )
                .await
            })
        };
        wait_until(
            &seen,
            "all three after the failure",
            Duration::from_secs(10),
            |s| s.len() == 4,
        )
        .await;
        let uids: Vec<u32> = seen.lock().unwrap().iter().map(|m| m.0).collect();
        assert_eq!(
            uids,
            vec![1, 2, 2, 3],
            "uid 2 again after reconnecting, uid 1 not"
        );
        cancel.cancel();
        let cursor = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run stops on cancel")
            .expect("run task");
        assert_eq!(cursor.last_uid, Some(3));
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_moves_and_expunges_only_when_writable() {
    let env = Env::start(1.0, None).await;
    within(30, async {
        let msgs: Vec<Vec<u8>> = (1..=4).map(|i| message(&format!("r{i}"))).collect();
        append(&env, &msgs).await;
        let move_to = RetentionAction::Move {
            folder: "Archivio".into(),
        };

        let mut ro = imap::connect(&office_imap(&env)).await.expect("connect");
        let err = imap::apply_retention(&mut ro, "INBOX", &[1], &move_to)
            .await
            .expect_err("read-only");
        assert!(matches!(err, ImapError::ReadOnly), "{err:?}");
        ro.logout().await;

        let mut cfg = office_imap(&env);
        cfg.read_only = false;
        let mut s = imap::connect(&cfg).await.expect("connect");
        assert_eq!(
            imap::apply_retention(&mut s, "INBOX", &[1, 2], &move_to)
                .await
                .expect("move"),
            2
        );
        assert_eq!(
            imap::apply_retention(&mut s, "INBOX", &[3], &RetentionAction::Expunge)
                .await
                .expect("expunge"),
            1
        );
        s.logout().await;

        assert_eq!(
            flags(&env).await.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![4]
        );
        let mut raw = imap_login(&env.info, OFFICE).await.expect("login");
        let mb = raw.examine("Archivio").await.expect("Archivio exists");
        assert_eq!(mb.exists, 2);
        let _ = raw.logout().await;
    })
    .await;
    env.shutdown().await;
}
