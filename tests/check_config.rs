//! `pecgate check-config [--connect]`: the real binary, on real files, and
//! with `--connect` against a running sandbox (its SMTP service and real
//! Dovecot, TLS with the sandbox CA). Exit statuses are sysexits: 0 fine,
//! 78 configuration unusable, 69 a server unreachable, untrusted or
//! refusing the login.
//!
//! Dovecot must be installed (see tests/sandbox_support).

#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::path::{Path, PathBuf};
use std::process::Output;

use sandbox_support::{Env, OFFICE, within};

/// Runs `pecgate --config CONFIG check-config ARGS...` with these extra
/// environment variables (and none of the caller's PECGATE ones).
async fn check(config: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pecgate"));
    cmd.arg("--config")
        .arg(config)
        .arg("check-config")
        .args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PECGATE") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(vars.iter().copied());
    cmd.output().await.expect("run pecgate check-config")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A small valid configuration in `dir` (folders relative to it).
fn write_config(dir: &Path, smtp_port: &str) -> PathBuf {
    std::fs::write(dir.join("password"), "segreto\n").unwrap();
    let path = dir.join("pecgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[store]
database = "state/pecgate.db"
archive = "state/archive"

[mailbox.protocollo]
address = "protocollo@pec.comune.example.it"
outbox = "protocollo/outbox"
sent = "protocollo/sent"
inbox = "protocollo/inbox"
smtp = {{ host = "smtps.pec.example.it", port = {smtp_port}, password_file = "password" }}
imap = {{ host = "imaps.pec.example.it", password_file = "password" }}
"#
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn an_invalid_configuration_exits_78_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "70000");
    let out = check(&config, &[], &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(78), "{stdout}{stderr}");
    assert!(
        stderr.contains(&config.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("mailbox.protocollo.smtp.port"),
        "names the key: {stderr}"
    );
    assert!(!stderr.contains("segreto") && !stdout.contains("segreto"));

    // A missing password file is a configuration error too, naming the key.
    let config = write_config(tmp.path(), "465");
    std::fs::remove_file(tmp.path().join("password")).unwrap();
    let out = check(&config, &[], &[]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("mailbox.protocollo.smtp.password_file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_valid_configuration_is_described_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "465");
    std::fs::create_dir_all(tmp.path().join("protocollo/outbox")).unwrap();
    let out = check(&config, &[], &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let d = tmp.path().display();
    for expected in [
        format!("configuration {d}/pecgate.toml: valid (1 mailbox)"),
        format!("ok     outbox {d}/protocollo/outbox: folder exists and is writable"),
        format!("ok     sent {d}/protocollo/sent: does not exist yet; pecgate will create it"),
        format!("ok     database {d}/state/pecgate.db: will be created"),
        "built-in PEC trust anchors: 3 certificate(s) loaded".to_owned(),
        "smtp smtps.pec.example.it:465: implicit TLS, login protocollo@pec.comune.example.it, password loaded (not shown)".to_owned(),
        "imap imaps.pec.example.it:993: implicit TLS".to_owned(),
        "result: ok (servers not contacted; add --connect to try them)".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("segreto"), "{stdout}");
    // Nothing was created by the check.
    assert!(!tmp.path().join("protocollo/sent").exists());
    assert!(!tmp.path().join("state").exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("protocollo/outbox"))
            .unwrap()
            .count(),
        0,
        "the probe file is removed"
    );
}

#[tokio::test]
async fn a_folder_that_cannot_be_created_exits_78() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "465");
    // "protocollo" is a file: its outbox, sent and inbox cannot exist.
    std::fs::write(tmp.path().join("protocollo"), b"not a folder").unwrap();
    let out = check(&config, &[], &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(78), "{stdout}{stderr}");
    let d = tmp.path().display();
    assert!(
        stdout.contains(&format!(
            "FAILED outbox {d}/protocollo/outbox: cannot be created: {d}/protocollo is not a folder"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("result: 3 problem(s)"), "{stdout}");
}

/// The sandbox's own `pecgate.toml`, rewritten by `edit` into a new file.
fn edited_config(env: &Env, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(env.dir().join("pecgate.toml")).unwrap();
    let path = env.tmp.path().join(name);
    std::fs::write(&path, edit(text)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tries_tls_and_login_on_every_server() {
    within(180, async {
        let env = Env::start(1.0, None).await;
        let config = env.dir().join("pecgate.toml");
        let smtp = format!("smtp 127.0.0.1:{}", env.info.smtps.port);
        let imap = format!("imap 127.0.0.1:{}", env.info.imaps.port);

        // 1. The sandbox configuration: every server answers and accepts.
        let out = check(&config, &["--connect", "--timeout", "10"], &[]).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        for expected in [
            format!("ok     {smtp}: TLS ok (TLSv1."),
            format!("ok     {imap}: TLS ok (TLSv1."),
            "login ok".to_owned(),
            "result: ok, every server answered and accepted the login".to_owned(),
        ] {
            assert!(stdout.contains(&expected), "{expected:?} in:\n{stdout}");
        }
        let smtp_line = stdout
            .lines()
            .find(|l| l.contains(&format!("{smtp}: TLS")))
            .unwrap();
        assert!(smtp_line.ends_with("login ok"), "{smtp_line}");
        let imap_line = stdout
            .lines()
            .find(|l| l.contains(&format!("{imap}: TLS")))
            .unwrap();
        assert!(
            imap_line.contains("login ok, folder INBOX ("),
            "{imap_line}"
        );
        let password = env.password(OFFICE);
        assert!(!stdout.contains(&password) && !stderr.contains(&password));

        // 2. A wrong password: both servers refuse the login; exit 69.
        let wrong = env.tmp.path().join("wrong-password");
        std::fs::write(&wrong, "not-the-password\n").unwrap();
        let wrong = wrong.display().to_string();
        let out = check(
            &config,
            &["--connect", "--timeout", "10"],
            &[
                ("PECGATE__MAILBOX__PROTOCOLLO__SMTP__PASSWORD_FILE", &wrong),
                ("PECGATE__MAILBOX__PROTOCOLLO__IMAP__PASSWORD_FILE", &wrong),
            ],
        )
        .await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
        for server in [&smtp, &imap] {
            let line = stdout
                .lines()
                .find(|l| l.contains(&format!("{server}: ")) && l.contains("TLS ok"))
                .unwrap_or_else(|| panic!("a line for {server}:\n{stdout}"));
            assert!(line.trim_start().starts_with("FAILED"), "{line}");
            assert!(
                line.contains("TLS ok") && line.contains("login refused"),
                "{line}"
            );
        }
        assert!(stdout.contains("refused the login (exit 69)"), "{stdout}");
        assert!(!stdout.contains("not-the-password"), "{stdout}");

        // 3. Without the sandbox CA the certificate is not trusted.
        let no_ca = edited_config(&env, "no-ca.toml", |t| {
            let ca = format!(", ca_file = \"{}\"", env.info.ca_file.display());
            assert!(t.contains(&ca), "the sandbox configuration names its CA");
            t.replace(&ca, "")
        });
        let out = check(&no_ca, &["--connect", "--timeout", "10"], &[]).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
        for server in [&smtp, &imap] {
            assert!(
                stdout.contains(&format!("FAILED {server}: certificate not trusted: ")),
                "{server} in:\n{stdout}"
            );
        }

        // 4. A port where nothing listens: unreachable, named; exit 69.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let port = closed.to_string();
        let out = check(
            &config,
            &["--connect", "--timeout", "5"],
            &[("PECGATE__MAILBOX__PROTOCOLLO__IMAP__PORT", &port)],
        )
        .await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!("FAILED imap 127.0.0.1:{closed}: unreachable: ")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("ok     {smtp}: TLS ok")),
            "{stdout}"
        );

        env.shutdown().await;
    })
    .await;
}
