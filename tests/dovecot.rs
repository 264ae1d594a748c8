//! The supervised Dovecot (`pecgate::sandbox::dovecot`) against the real
//! server: TLS logins with async-imap, APPEND/FETCH byte for byte, the
//! refusals, UIDVALIDITY changes, restarts, parallel instances and clean
//! shutdowns.
//!
//! Dovecot must be installed (`apt-get install dovecot-imapd`, done by
//! scripts/setup): without it every test FAILS with that command in its
//! message; none is skipped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_imap::types::QuotaResourceName;
use futures::TryStreamExt;
use jiff::{SignedDuration, Timestamp};
use pecgate::pki::{Validity, cert_pem, key_pem, make_ca, make_tls_server_cert};
use pecgate::sandbox::dovecot::{Dovecot, DovecotConfig, DovecotError, free_ports};
use tempfile::TempDir;
use tokio::net::TcpStream;

type Tls = tokio_native_tls::TlsStream<TcpStream>;
type Session = async_imap::Session<Tls>;

const USER: &str = "pec@example.test";
const PASSWORD: &str = "s3cret-pw";

/// A message with CRLF line ends (Dovecot keeps it byte for byte).
const MESSAGE: &[u8] = b"From: mittente@example.test\r\n\
To: pec@example.test\r\n\
Subject: prova di consegna\r\n\
Message-ID: <dovecot-test-1@example.test>\r\n\
Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Buongiorno,\r\n\
questo e' un messaggio di prova.\r\n";

/// Every test body runs under this limit, so a hang fails instead of
/// blocking the run.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(25), f)
        .await
        .expect("test took more than 25 s")
}

/// A throwaway CA and a `localhost`/127.0.0.1 server certificate, as PEM
/// files in their own temporary directory.
struct Pki {
    ca_pem: Vec<u8>,
    cert: PathBuf,
    key: PathBuf,
    _dir: TempDir,
}

fn pki() -> Pki {
    let now = Timestamp::now();
    let validity = Validity {
        not_before: now - SignedDuration::from_hours(24),
        not_after: now + SignedDuration::from_hours(24 * 30),
    };
    let ca = make_ca("Test Mail CA", "pecgate tests", validity, 2048).expect("ca");
    let server = make_tls_server_cert(&ca, &["localhost"], &["127.0.0.1"], validity)
        .expect("server certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, cert_pem(&server.cert).unwrap()).unwrap();
    std::fs::write(&key, key_pem(&server.key).unwrap()).unwrap();
    Pki {
        ca_pem: cert_pem(&ca.cert).unwrap(),
        cert,
        key,
        _dir: dir,
    }
}

fn config(dir: &Path, pki: &Pki) -> DovecotConfig {
    let ports = free_ports(2).expect("free ports");
    DovecotConfig {
        dir: dir.to_owned(),
        imap_port: ports[0],
        imaps_port: ports[1],
        cert_pem: pki.cert.clone(),
        key_pem: pki.key.clone(),
        users: vec![
            (USER.to_owned(), PASSWORD.to_owned()),
            ("other@example.test".to_owned(), "other-pw".to_owned()),
        ],
    }
}

/// Starts Dovecot, failing (never skipping) with the install command if it
/// is missing.
async fn start(cfg: &DovecotConfig) -> Dovecot {
    if let Err(e) = Dovecot::binary_available() {
        panic!("{e}");
    }
    Dovecot::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("starting dovecot: {e}"))
}

fn connector(ca_pem: &[u8]) -> tokio_native_tls::TlsConnector {
    let ca = native_tls::Certificate::from_pem(ca_pem).expect("ca pem");
    native_tls::TlsConnector::builder()
        .add_root_certificate(ca)
        .build()
        .expect("tls connector")
        .into()
}

/// Implicit TLS, greeting consumed.
async fn imaps(port: u16, ca_pem: &[u8]) -> async_imap::Client<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let tls = connector(ca_pem)
        .connect("localhost", tcp)
        .await
        .expect("tls handshake");
    let mut client = async_imap::Client::new(tls);
    client
        .read_response()
        .await
        .expect("greeting")
        .expect("no greeting");
    client
}

/// Clear text, greeting consumed (for STARTTLS or to show refusals).
async fn plain(port: u16) -> async_imap::Client<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut client = async_imap::Client::new(tcp);
    client
        .read_response()
        .await
        .expect("greeting")
        .expect("no greeting");
    client
}

/// STARTTLS on the clear-text port (no greeting follows the handshake).
async fn starttls(port: u16, ca_pem: &[u8]) -> async_imap::Client<Tls> {
    let mut client = plain(port).await;
    client
        .run_command_and_check_ok("STARTTLS", None)
        .await
        .expect("STARTTLS");
    let tls = connector(ca_pem)
        .connect("localhost", client.into_inner())
        .await
        .expect("tls handshake after STARTTLS");
    async_imap::Client::new(tls)
}

async fn login(client: async_imap::Client<Tls>, user: &str, password: &str) -> Session {
    client
        .login(user, password)
        .await
        .map_err(|(e, _)| e)
        .unwrap_or_else(|e| panic!("login {user}: {e}"))
}

/// The full bytes of every message in INBOX (SELECTs it).
async fn inbox_bodies(s: &mut Session) -> Vec<Vec<u8>> {
    let mb = s.select("INBOX").await.expect("select INBOX");
    if mb.exists == 0 {
        return Vec::new();
    }
    let fetches: Vec<_> = s
        .fetch("1:*", "BODY.PEEK[]")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch responses");
    fetches
        .iter()
        .map(|f| f.body().expect("body").to_vec())
        .collect()
}

/// Live processes of an instance: the master's command line names the
/// config file, the others are titled `dovecot-<instance>/<service>`
/// (zombies have an empty command line).
fn processes_of(instance: &str, conf: &Path) -> Vec<(u32, String)> {
    let conf = conf.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(instance) || cmdline.contains(&conf) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits up to `limit` for the instance's processes to be gone.
async fn assert_gone(instance: &str, conf: &Path, limit: Duration) {
    let started = Instant::now();
    loop {
        let left = processes_of(instance, conf);
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "dovecot processes left after {limit:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn append_and_fetch_over_implicit_tls_and_starttls() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &pki);
        let dovecot = start(&cfg).await;
        assert!(!processes_of(dovecot.instance_name(), &dovecot.config_path()).is_empty());

        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        let caps = s.capabilities().await.expect("capabilities");
        for cap in ["IDLE", "QUOTA", "UIDPLUS"] {
            assert!(caps.has_str(cap), "capability {cap} missing");
        }
        let (roots, quotas) = s.get_quota_root("INBOX").await.expect("GETQUOTAROOT");
        assert_eq!(roots.len(), 1, "{roots:?}");
        let storage = quotas
            .iter()
            .flat_map(|q| &q.resources)
            .find(|r| r.name == QuotaResourceName::Storage)
            .unwrap_or_else(|| panic!("no STORAGE quota in {quotas:?}"));
        assert_eq!(storage.limit, 1024 * 1024, "1G in KiB");

        s.append("INBOX", None, None, MESSAGE)
            .await
            .expect("APPEND");
        let mb = s.select("INBOX").await.expect("select");
        assert_eq!(mb.exists, 1);
        assert!(mb.uid_validity.is_some());
        assert_eq!(inbox_bodies(&mut s).await, vec![MESSAGE.to_vec()]);
        s.logout().await.expect("logout");

        // The same message over STARTTLS.
        let mut s = login(
            starttls(dovecot.imap_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        assert_eq!(inbox_bodies(&mut s).await, vec![MESSAGE.to_vec()]);
        s.logout().await.expect("logout");

        // Mailboxes are per user.
        let mut other = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            "other@example.test",
            "other-pw",
        )
        .await;
        assert!(inbox_bodies(&mut other).await.is_empty());
        other.logout().await.expect("logout");

        let (instance, conf) = (dovecot.instance_name().to_owned(), dovecot.config_path());
        dovecot.stop().await.expect("stop");
        // stop returns only once the group is gone.
        assert_gone(&instance, &conf, Duration::ZERO).await;
    })
    .await;
}

#[tokio::test]
async fn wrong_password_and_login_before_starttls_are_refused() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &pki);
        let dovecot = start(&cfg).await;

        let refused = imaps(dovecot.imaps_port(), &pki.ca_pem)
            .await
            .login(USER, "wrong")
            .await;
        assert!(refused.is_err(), "wrong password accepted");

        // Right password, but in clear text on loopback.
        let refused = plain(dovecot.imap_port()).await.login(USER, PASSWORD).await;
        assert!(refused.is_err(), "LOGIN accepted before STARTTLS");

        // No growing auth penalty: the next logins are fast.
        let t = Instant::now();
        for _ in 0..3 {
            let refused = imaps(dovecot.imaps_port(), &pki.ca_pem)
                .await
                .login(USER, "wrong again")
                .await;
            assert!(refused.is_err());
        }
        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        s.logout().await.expect("logout");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "logins slowed down after failures: {:?}",
            t.elapsed()
        );
        dovecot.kill().await.expect("kill");
    })
    .await;
}

#[tokio::test]
async fn set_uid_validity_is_seen_by_select() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let dovecot = start(&config(dir.path(), &pki)).await;

        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        let before = s.select("INBOX").await.expect("select").uid_validity;
        s.logout().await.expect("logout");
        let before = before.expect("UIDVALIDITY");
        assert_eq!(
            dovecot.uid_validity(USER, "INBOX").expect("doveadm"),
            before
        );

        let new = before.wrapping_add(1000);
        dovecot
            .set_uid_validity(USER, "INBOX", new)
            .expect("set uid validity");
        assert_eq!(dovecot.uid_validity(USER, "INBOX").expect("doveadm"), new);
        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        let after = s.select("INBOX").await.expect("select").uid_validity;
        assert_eq!(after, Some(new));
        s.logout().await.expect("logout");

        let err = dovecot
            .set_uid_validity("nobody-here@example.test", "INBOX", 7)
            .expect_err("unknown user");
        assert!(matches!(err, DovecotError::Doveadm { .. }), "{err}");
        dovecot.kill().await.expect("kill");
    })
    .await;
}

#[tokio::test]
async fn restart_keeps_mail_and_users_and_drops_sessions() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let mut dovecot = start(&config(dir.path(), &pki)).await;

        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        s.append("INBOX", None, None, MESSAGE)
            .await
            .expect("APPEND");
        s.select("INBOX").await.expect("select");

        // A user added while running can log in at once, and after restarts.
        dovecot
            .add_user("new@example.test", "new-pw")
            .await
            .expect("add user");
        assert!(dovecot.add_user("NEW@example.test", "x").await.is_err());
        let mut n = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            "new@example.test",
            "new-pw",
        )
        .await;
        n.logout().await.expect("logout");

        let old_pid = dovecot.pid();
        dovecot.restart().await.expect("restart");
        assert_ne!(dovecot.pid(), old_pid);

        // The session open across the restart is gone.
        assert!(s.noop().await.is_err(), "session survived the restart");

        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        assert_eq!(inbox_bodies(&mut s).await, vec![MESSAGE.to_vec()]);
        s.logout().await.expect("logout");
        let mut n = login(
            starttls(dovecot.imap_port(), &pki.ca_pem).await,
            "new@example.test",
            "new-pw",
        )
        .await;
        n.logout().await.expect("logout");
        dovecot.kill().await.expect("kill");
    })
    .await;
}

#[tokio::test]
async fn two_instances_run_at_once() {
    within(async {
        let pki = pki();
        // Two directories side by side under one private (0700) temporary
        // directory, as the sandbox lays them out.
        let tmp = tempfile::tempdir().unwrap();
        let (d1, d2) = (
            tmp.path().join("one/dovecot"),
            tmp.path().join("two/dovecot"),
        );
        let (c1, c2) = (config(&d1, &pki), config(&d2, &pki));
        let (a, b) = tokio::join!(start(&c1), start(&c2));
        assert_ne!(a.instance_name(), b.instance_name());

        let mut s = login(imaps(a.imaps_port(), &pki.ca_pem).await, USER, PASSWORD).await;
        s.append("INBOX", None, None, MESSAGE)
            .await
            .expect("APPEND");
        s.logout().await.expect("logout");

        let mut s = login(starttls(b.imap_port(), &pki.ca_pem).await, USER, PASSWORD).await;
        assert!(
            inbox_bodies(&mut s).await.is_empty(),
            "instances share mail"
        );
        s.logout().await.expect("logout");
        let mut s = login(starttls(a.imap_port(), &pki.ca_pem).await, USER, PASSWORD).await;
        assert_eq!(inbox_bodies(&mut s).await.len(), 1);
        s.logout().await.expect("logout");

        let ((ia, ca), (ib, cb)) = (
            (a.instance_name().to_owned(), a.config_path()),
            (b.instance_name().to_owned(), b.config_path()),
        );
        let (ra, rb) = tokio::join!(a.stop(), b.stop());
        ra.expect("stop a");
        rb.expect("stop b");
        assert_gone(&ia, &ca, Duration::ZERO).await;
        assert_gone(&ib, &cb, Duration::ZERO).await;
    })
    .await;
}

#[tokio::test]
async fn drop_kills_everything_and_the_dir_can_be_reused() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &pki);
        let dovecot = start(&cfg).await;
        let (instance, conf) = (dovecot.instance_name().to_owned(), dovecot.config_path());
        drop(dovecot);
        assert_gone(&instance, &conf, Duration::from_secs(2)).await;

        // The killed master left run/master.pid behind; a new start copes.
        let dovecot = start(&cfg).await;
        let mut s = login(
            imaps(dovecot.imaps_port(), &pki.ca_pem).await,
            USER,
            PASSWORD,
        )
        .await;
        s.logout().await.expect("logout");
        dovecot.stop().await.expect("stop");
        assert_gone(&instance, &conf, Duration::ZERO).await;
    })
    .await;
}

#[tokio::test]
async fn a_taken_port_is_reported_with_the_log() {
    within(async {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), &pki);
        // Something else listens on the STARTTLS port (and accepts TCP).
        let squatter = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        cfg.imap_port = squatter.local_addr().unwrap().port();
        if let Err(e) = Dovecot::binary_available() {
            panic!("{e}");
        }
        let err = Dovecot::start(&cfg)
            .await
            .expect_err("started on a taken port");
        let text = err.to_string();
        assert!(
            matches!(err, DovecotError::Exited { .. }),
            "unexpected error: {text}"
        );
        assert!(text.contains("Address already in use"), "{text}");
        drop(squatter);
    })
    .await;
}

#[tokio::test]
async fn invalid_configs_are_refused_before_starting() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &pki);
    cfg.users
        .push(("bad:name@example.test".into(), "pw".into()));
    let err = Dovecot::start(&cfg).await.expect_err("bad user accepted");
    assert!(
        matches!(err, DovecotError::Config(_) | DovecotError::NotInstalled),
        "{err}"
    );

    let mut cfg = config(dir.path(), &pki);
    cfg.cert_pem = dir.path().join("missing.pem");
    let err = Dovecot::start(&cfg)
        .await
        .expect_err("missing cert accepted");
    if Dovecot::binary_available().is_ok() {
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
