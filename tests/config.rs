//! The configuration loader against real files in temporary directories.
//! The process environment is never touched: overrides and `password_env`
//! look-ups go through `Config::load_with_env`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::SignedDuration;
use pecgate::config::{Config, ConfigError, LogFormat, RetentionAction, TlsMode};

const PASSWORD: &str = "s3cr3t-Pa55word";
const EXAMPLE_CREDENTIAL: &str = "/run/credentials/pecgate.service/protocollo";

fn example_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pecgate.toml");
    std::fs::read_to_string(path).unwrap()
}

/// The shipped example, copied to `dir` with its password file replaced by a
/// relative one (resolved against `dir`) that exists.
fn example_in(dir: &Path) -> PathBuf {
    let text = example_text();
    assert!(text.contains(EXAMPLE_CREDENTIAL));
    std::fs::write(dir.join("protocollo.pw"), format!("{PASSWORD}\n")).unwrap();
    write(dir, &text.replace(EXAMPLE_CREDENTIAL, "protocollo.pw"))
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pecgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A small valid configuration; passwords come from `PW`.
fn minimal() -> String {
    r#"
[store]
database = "/var/lib/pecgate/pecgate.db"
archive = "/var/lib/pecgate/archive"

[mailbox.protocollo]
address = "protocollo@pec.comune.example.it"
outbox = "/srv/p/outbox"
sent = "/srv/p/sent"
inbox = "/srv/p/inbox"
smtp = { host = "smtps.pec.example.it", password_env = "PW" }
imap = { host = "imaps.pec.example.it", password_env = "PW" }
"#
    .to_string()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.push(("PW".to_string(), PASSWORD.to_string()));
    v
}

fn load(path: &Path, pairs: &[(&str, &str)]) -> Config {
    match Config::load_with_env(path, env(pairs)) {
        Ok(c) => c,
        Err(e) => panic!("expected to load, got:\n{e}"),
    }
}

fn error(path: &Path, pairs: &[(&str, &str)]) -> String {
    match Config::load_with_env(path, env(pairs)) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts `msg` names the file and contains every `part`.
fn assert_names(msg: &str, path: &Path, parts: &[&str]) {
    assert!(
        msg.contains(&path.display().to_string()),
        "no file name in: {msg}"
    );
    for p in parts {
        assert!(msg.contains(p), "{p:?} missing in: {msg}");
    }
}

#[test]
fn example_loads_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = example_in(dir.path());
    let c = load(&path, &[]);

    assert_eq!(c.gateway.hostname, "pecgate.comune.example.it");
    assert_eq!(c.store.database, Path::new("/var/lib/pecgate/pecgate.db"));
    assert_eq!(c.store.archive, Path::new("/var/lib/pecgate/archive"));
    assert!(c.trust.anchors.is_empty());
    assert_eq!(c.outbox.settle, Duration::from_secs(5));
    assert_eq!(c.outbox.rescan, Duration::from_secs(30));
    assert_eq!(c.deadlines.acceptance, SignedDuration::from_mins(30));
    assert_eq!(c.deadlines.delivery, SignedDuration::from_hours(26));
    assert_eq!(c.deadlines.uncertain_grace, SignedDuration::from_mins(15));
    assert_eq!(c.deadlines.delivery_std(), Duration::from_secs(26 * 3600));
    assert_eq!(c.logging.level, "info");
    assert_eq!(c.logging.format, LogFormat::Auto);
    assert_eq!(c.report.unit_price_cents, 540);
    let b = c.backup.as_ref().unwrap();
    assert_eq!(b.dir, Path::new("/var/backups/pecgate"));
    assert_eq!(b.every, Duration::from_secs(24 * 3600));
    assert_eq!(b.keep, 14);

    assert_eq!(c.mailboxes.len(), 1);
    let m = c.mailbox("protocollo").unwrap();
    assert_eq!(m.name, "protocollo");
    assert_eq!(m.address, "protocollo@pec.comune.example.it");
    assert_eq!(m.outbox, Path::new("/srv/pecgate/protocollo/outbox"));
    assert_eq!(m.sent, Path::new("/srv/pecgate/protocollo/sent"));
    assert_eq!(m.inbox, Path::new("/srv/pecgate/protocollo/inbox"));

    let s = &m.smtp;
    assert_eq!(s.host, "smtps.pec.example.it");
    assert_eq!(s.port, 465);
    assert_eq!(s.tls, TlsMode::Implicit);
    assert_eq!(s.username, "protocollo@pec.comune.example.it");
    assert_eq!(s.password.expose(), PASSWORD);
    assert_eq!(s.ca_file, None);
    assert_eq!(s.timeout, Duration::from_secs(60));

    let i = &m.imap;
    assert_eq!(i.server.host, "imaps.pec.example.it");
    assert_eq!(i.server.port, 993);
    assert_eq!(i.server.tls, TlsMode::Implicit);
    assert_eq!(i.server.username, "protocollo@pec.comune.example.it");
    assert_eq!(i.server.password.expose(), PASSWORD);
    assert_eq!(i.server.timeout, Duration::from_secs(60));
    assert_eq!(i.folder, "INBOX");
    assert!(i.idle);
    assert_eq!(i.poll, Duration::from_secs(60));
    assert!(i.read_only);
    assert_eq!(i.quota_warn_percent, 80);

    assert_eq!(m.pace.per_minute, 5);
    assert_eq!(m.pace.per_day, 1000);
    assert_eq!(m.limits.max_recipients, 500);
    assert_eq!(m.limits.max_total_bytes, 100_000_000);
    assert_eq!(m.limits.blocked_extensions.len(), 14);
    assert!(m.limits.is_blocked("fattura.pdf.exe"));
    assert_eq!(m.retention, None);
}

#[test]
fn example_lists_every_key() {
    // Every key the schema knows appears in the example, set or commented.
    let text = example_text();
    for key in [
        "hostname",
        "database",
        "archive",
        "anchors",
        "settle_seconds",
        "rescan_seconds",
        "acceptance_minutes",
        "delivery_hours",
        "uncertain_grace_minutes",
        "level",
        "format",
        "unit_price_eur",
        "dir",
        "every_hours",
        "keep",
        "address",
        "outbox",
        "sent",
        "inbox",
        "host",
        "port",
        "tls",
        "username",
        "password_file",
        "password_env",
        "ca_file",
        "timeout_seconds",
        "folder",
        "idle",
        "poll_seconds",
        "read_only",
        "quota_warn_percent",
        "per_minute",
        "per_day",
        "max_recipients",
        "max_total_bytes",
        "blocked_extensions",
        "after_days",
        "action",
        "retention",
    ] {
        assert!(text.contains(key), "the example does not mention {key}");
    }
}

#[test]
fn minimal_gets_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let c = load(&write(dir.path(), &minimal()), &[]);
    assert!(!c.gateway.hostname.is_empty());
    assert_eq!(c.backup, None);
    let m = c.mailbox("protocollo").unwrap();
    assert_eq!(m.smtp.port, 465);
    assert_eq!(m.imap.server.port, 993);
    assert_eq!(m.smtp.username, m.address);
    assert_eq!(m.pace.per_minute, 5);
    assert_eq!(m.limits.blocked_extensions.len(), 14);
    assert_eq!(c.deadlines.acceptance, SignedDuration::from_mins(30));
}

#[test]
fn env_overrides_exactly_those_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = example_in(dir.path());
    let before = load(&path, &[]);
    let after = load(
        &path,
        &[
            ("PECGATE__MAILBOX__PROTOCOLLO__SMTP__PORT", "587"),
            ("PECGATE__DEADLINES__DELIVERY_HOURS", "2"),
            ("PECGATE_CONFIG", "/nonexistent/pecgate.toml"),
            ("UNRELATED", "x"),
        ],
    );
    assert_eq!(after.mailbox("protocollo").unwrap().smtp.port, 587);
    assert_eq!(after.deadlines.delivery, SignedDuration::from_hours(2));

    let mut expected = before.clone();
    expected.mailboxes.get_mut("protocollo").unwrap().smtp.port = 587;
    expected.deadlines.delivery = SignedDuration::from_hours(2);
    assert_eq!(after, expected);
}

#[test]
fn env_override_of_strings_and_booleans() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &minimal());
    let c = load(
        &path,
        &[
            ("PECGATE__MAILBOX__PROTOCOLLO__IMAP__IDLE", "false"),
            ("PECGATE__MAILBOX__PROTOCOLLO__SMTP__TLS", "starttls"),
            ("PECGATE__LOGGING__LEVEL", "debug"),
        ],
    );
    let m = c.mailbox("protocollo").unwrap();
    assert!(!m.imap.idle);
    assert_eq!(m.smtp.tls, TlsMode::StartTls);
    assert_eq!(m.smtp.port, 587, "the default port follows tls");
    assert_eq!(c.logging.level, "debug");
}

#[test]
fn pecgate_config_is_not_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &minimal());
    // One underscore: names the file, never read as a key.
    load(&path, &[("PECGATE_CONFIG", "/elsewhere.toml")]);
    // With the double underscore it would be a key, and an unknown one.
    let msg = error(&path, &[("PECGATE__CONFIG", "/elsewhere.toml")]);
    assert_names(&msg, &path, &["config: unknown key", "PECGATE__CONFIG"]);
}

#[test]
fn bad_env_value_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &minimal());
    let msg = error(&path, &[("PECGATE__MAILBOX__PROTOCOLLO__SMTP__PORT", "0")]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.smtp.port: 0 is not a valid port (1-65535)",
            "PECGATE__MAILBOX__PROTOCOLLO__SMTP__PORT",
        ],
    );
}

#[test]
fn unknown_key_at_top_level() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &format!("colour = \"blue\"\n{}", minimal()));
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["colour: unknown key (expected one of: gateway, store,"],
    );
}

#[test]
fn unknown_key_in_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace("inbox = ", "inbx = \"/x\"\ninbox = ");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.inbx: unknown key", "address", "outbox"],
    );
}

#[test]
fn unknown_key_in_smtp() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace("smtp = { host", "smtp = { prot = 25, host");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp.prot: unknown key (expected one of: host, port, tls,"],
    );
}

#[test]
fn password_in_file_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace("smtp = { host", "smtp = { password = \"x\", host");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.smtp.password: unknown key",
            "password_file or password_env",
        ],
    );
}

#[test]
fn missing_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pw");
    let text = minimal().replace(
        "smtp = { host = \"smtps.pec.example.it\", password_env = \"PW\" }",
        &format!(
            "smtp = {{ host = \"smtps.pec.example.it\", password_file = \"{}\" }}",
            missing.display()
        ),
    );
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.smtp.password_file: cannot read",
            &missing.display().to_string(),
            "No such file or directory",
        ],
    );
}

#[test]
fn empty_password_file_and_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pw"), "\n").unwrap();
    std::fs::write(dir.path().join("ok.pw"), "pa ss\r\n").unwrap();
    let text = minimal().replace(
        "smtp = { host = \"smtps.pec.example.it\", password_env = \"PW\" }",
        "smtp = { host = \"smtps.pec.example.it\", password_file = \"empty.pw\" }",
    );
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp.password_file", "empty.pw is empty"],
    );

    let path = write(dir.path(), &text.replace("empty.pw", "ok.pw"));
    let c = load(&path, &[]);
    assert_eq!(
        c.mailbox("protocollo").unwrap().smtp.password.expose(),
        "pa ss"
    );
}

#[test]
fn both_or_neither_password_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.pw"), "x").unwrap();
    let both = minimal().replace(
        "smtp = { host = \"smtps.pec.example.it\", password_env = \"PW\" }",
        "smtp = { host = \"smtps.pec.example.it\", password_env = \"PW\", password_file = \"p.pw\" }",
    );
    let path = write(dir.path(), &both);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp: both password_file and password_env"],
    );

    let neither = minimal().replace(
        "imap = { host = \"imaps.pec.example.it\", password_env = \"PW\" }",
        "imap = { host = \"imaps.pec.example.it\" }",
    );
    let path = write(dir.path(), &neither);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.imap: no password",
            "password_file",
            "password_env",
        ],
    );
}

#[test]
fn password_env_must_be_set() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace(
        "password_env = \"PW\" }\nimap",
        "password_env = \"PECGATE_SMTP_PW\" }\nimap",
    );
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp.password_env: environment variable PECGATE_SMTP_PW is not set"],
    );
    let c = load(&path, &[("PECGATE_SMTP_PW", "other")]);
    assert_eq!(
        c.mailbox("protocollo").unwrap().smtp.password.expose(),
        "other"
    );
}

#[test]
fn bad_tls_value() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace("smtp = { host", "smtp = { tls = \"ssl\", host");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.smtp.tls: \"ssl\" is not a TLS mode (expected one of: implicit, starttls, insecure-plaintext)",
        ],
    );
}

#[test]
fn port_zero_and_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal()
        .replace("smtp = { host", "smtp = { port = 0, host")
        .replace("imap = { host", "imap = { port = 70000, host");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    // Both problems are reported at once, one line each.
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp.port: 0 is not a valid port (1-65535)"],
    );
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.imap.port: 70000 is not a valid port (1-65535)"],
    );
    assert_eq!(msg.lines().count(), 2, "{msg}");
}

#[test]
fn wrong_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal().replace("smtp = { host", "smtp = { port = \"smtp\", host");
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.smtp.port: wrong type", "\"smtp\""],
    );
}

#[test]
fn bad_address_and_lowercasing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &minimal().replace("protocollo@pec.comune.example.it", "protocollo at pec"),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.address: \"protocollo at pec\" is not an e-mail address"],
    );

    let path = write(
        dir.path(),
        &minimal().replace(
            "protocollo@pec.comune.example.it",
            "Protocollo@PEC.Comune.Example.IT",
        ),
    );
    let c = load(&path, &[]);
    assert_eq!(
        c.mailbox("protocollo").unwrap().address,
        "protocollo@pec.comune.example.it"
    );
}

#[test]
fn bad_mailbox_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &minimal().replace("[mailbox.protocollo]", "[mailbox.\"Ufficio Protocollo\"]"),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.Ufficio Protocollo: ", "not a valid mailbox name"],
    );
}

#[test]
fn relative_paths_resolve_against_the_config_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("etc");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(
        sub.join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("anchors")).unwrap();
    let text = minimal()
        .replace("/srv/p/outbox", "../spool/outbox")
        .replace("/srv/p/sent", "./sent")
        .replace("/var/lib/pecgate/pecgate.db", "state/pecgate.db")
        .replace("smtp = { host", "smtp = { ca_file = \"ca.pem\", host")
        + "[trust]\nanchors = \"../anchors\"\n";
    let path = write(&sub, &text);
    let c = load(&path, &[]);
    let base = std::path::absolute(&sub).unwrap();
    let m = c.mailbox("protocollo").unwrap();
    assert_eq!(m.outbox, base.parent().unwrap().join("spool/outbox"));
    assert_eq!(m.sent, base.join("sent"));
    assert_eq!(c.store.database, base.join("state/pecgate.db"));
    assert_eq!(
        m.smtp.ca_file.as_deref(),
        Some(base.join("ca.pem").as_path())
    );
    assert_eq!(
        c.trust.anchors,
        vec![base.parent().unwrap().join("anchors")]
    );
}

#[test]
fn ca_file_must_hold_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let path = write(
        dir.path(),
        &minimal().replace("smtp = { host", "smtp = { ca_file = \"ca.pem\", host"),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocollo.smtp.ca_file",
            "holds no PEM certificate",
        ],
    );
}

#[test]
fn no_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal();
    let text = &text[..text.find("[mailbox.protocollo]").unwrap()];
    let path = write(dir.path(), text);
    let msg = error(&path, &[]);
    assert_names(&msg, &path, &["mailbox: no mailbox configured"]);
}

#[test]
fn missing_required_keys_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[store]\n[mailbox.a]\n");
    let msg = error(&path, &[]);
    for key in [
        "store.database: missing",
        "store.archive: missing",
        "mailbox.a.address: missing",
        "mailbox.a.outbox: missing",
        "mailbox.a.smtp: missing",
        "mailbox.a.imap: missing",
    ] {
        assert_names(&msg, &path, &[key]);
    }
}

#[test]
fn duplicate_address_and_shared_folder() {
    let dir = tempfile::tempdir().unwrap();
    let second = minimal()[minimal().find("[mailbox.protocollo]").unwrap()..]
        .replace("[mailbox.protocollo]", "[mailbox.ragioneria]")
        .replace("/srv/p/outbox", "/srv/r/outbox")
        .replace("/srv/p/sent", "/srv/r/sent");
    let path = write(dir.path(), &format!("{}\n{second}", minimal()));
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.ragioneria.address: protocollo@pec.comune.example.it is also the address of mailbox.protocollo",
            "mailbox.ragioneria.inbox: /srv/p/inbox is also mailbox.protocollo.inbox",
        ],
    );
}

#[test]
fn same_folder_twice_in_one_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &minimal().replace("/srv/p/sent", "/srv/p/outbox/"),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["mailbox.protocollo.sent: /srv/p/outbox is also mailbox.protocollo.outbox"],
    );
}

#[test]
fn pace_limits_and_durations_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let text = minimal()
        + "pace = { per_minute = 0 }\nlimits = { max_total_bytes = -1 }\n"
        + "[deadlines]\nacceptance_minutes = 0\n[outbox]\nsettle_seconds = -2\n";
    let path = write(dir.path(), &text);
    let msg = error(&path, &[]);
    for part in [
        "mailbox.protocollo.pace.per_minute: 0 is too small (at least 1)",
        "mailbox.protocollo.limits.max_total_bytes: -1 is too small",
        "deadlines.acceptance_minutes: 0 is not a positive number of minutes",
        "outbox.settle_seconds: -2 is not a positive number of seconds",
    ] {
        assert_names(&msg, &path, &[part]);
    }
}

#[test]
fn fractional_durations_for_tests() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        minimal() + "[deadlines]\nacceptance_minutes = 0.05\n[outbox]\nsettle_seconds = 0.2\n";
    let c = load(&write(dir.path(), &text), &[]);
    assert_eq!(c.deadlines.acceptance, SignedDuration::from_secs(3));
    assert_eq!(c.outbox.settle, Duration::from_millis(200));
}

#[test]
fn logging_level_and_format_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &(minimal() + "[logging]\nlevel = \"degub\"\nformat = \"xml\"\n"),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &[
            "logging.level: \"degub\" is not a level",
            "logging.format: \"xml\" is not a log format",
        ],
    );
    let c = load(
        &write(
            dir.path(),
            &(minimal() + "[logging]\nlevel = \"pecgate=debug,warn\"\nformat = \"json\"\n"),
        ),
        &[],
    );
    assert_eq!(c.logging.format, LogFormat::Json);
}

#[test]
fn report_price() {
    let dir = tempfile::tempdir().unwrap();
    let c = load(
        &write(dir.path(), &(minimal() + "[report]\nunit_price_eur = 6\n")),
        &[],
    );
    assert_eq!(c.report.unit_price_cents, 600);
    let path = write(
        dir.path(),
        &(minimal() + "[report]\nunit_price_eur = -1.0\n"),
    );
    assert_names(
        &error(&path, &[]),
        &path,
        &["report.unit_price_eur: -1 is not a price"],
    );
    let path = write(
        dir.path(),
        &(minimal() + "[report]\nunit_price_eur = 5.405\n"),
    );
    assert_names(
        &error(&path, &[]),
        &path,
        &["report.unit_price_eur: 5.405 has fractions of a cent"],
    );
}

#[test]
fn retention() {
    let dir = tempfile::tempdir().unwrap();
    let ok = minimal().replace(
        "imap = { host = \"imaps.pec.example.it\", password_env = \"PW\" }",
        "imap = { host = \"imaps.pec.example.it\", password_env = \"PW\", read_only = false }",
    ) + "retention = { after_days = 90, action = \"move\", folder = \"Archivio\" }\n";
    let c = load(&write(dir.path(), &ok), &[]);
    let r = c.mailbox("protocollo").unwrap().retention.clone().unwrap();
    assert_eq!(r.after_days, 90);
    assert_eq!(
        r.action,
        RetentionAction::Move {
            folder: "Archivio".to_string()
        }
    );
    assert_eq!(r.after(), SignedDuration::from_hours(90 * 24));

    let read_only = minimal() + "retention = { after_days = 90, action = \"expunge\" }\n";
    let path = write(dir.path(), &read_only);
    assert_names(
        &error(&path, &[]),
        &path,
        &["mailbox.protocollo.retention: ", "read_only = false"],
    );

    let bad = ok.replace("\"move\"", "\"delete\"");
    let path = write(dir.path(), &bad);
    assert_names(
        &error(&path, &[]),
        &path,
        &["mailbox.protocollo.retention.action: \"delete\" is not a retention action"],
    );
}

#[test]
fn secret_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let c = load(&example_in(dir.path()), &[]);
    let debug = format!("{c:?}");
    assert!(!debug.contains(PASSWORD), "password leaked: {debug}");
    assert!(debug.contains("Secret(***)"));
    let alt = format!("{c:#?}");
    assert!(!alt.contains(PASSWORD));
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let err = Config::load_with_env(&path, env(&[])).unwrap_err();
    assert!(matches!(err, ConfigError::NotFound { .. }));
    let msg = err.to_string();
    assert_names(
        &msg,
        &path,
        &[
            "no configuration file:",
            "does not exist",
            "--config FILE",
            "PECGATE_CONFIG",
        ],
    );
}

#[test]
fn load_prefers_explicit_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    // Config::load reads the process environment; only the error path is
    // exercised here, which needs no PW variable.
    let err = Config::load(Some(&path)).unwrap_err();
    assert_eq!(err.path(), std::path::absolute(&path).unwrap());
}

#[test]
fn invalid_toml() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[store\n");
    let msg = error(&path, &[]);
    assert_names(&msg, &path, &["line 1"]);
}

#[test]
fn env_typo_in_mailbox_name_points_at_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &minimal());
    let msg = error(&path, &[("PECGATE__MAILBOX__PROTOCOLO__SMTP__PORT", "587")]);
    assert_names(
        &msg,
        &path,
        &[
            "mailbox.protocolo.address: missing (required) (mailbox.protocolo is not in the file: it comes from environment variable PECGATE__MAILBOX__PROTOCOLO__SMTP__PORT)",
        ],
    );
}

#[test]
fn table_given_as_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &format!(
            "store = 5\n{}",
            &minimal()
                .replace("[store]", "")
                .replace("database = \"/var/lib/pecgate/pecgate.db\"", "")
                .replace("archive = \"/var/lib/pecgate/archive\"", "")
        ),
    );
    let msg = error(&path, &[]);
    assert_names(
        &msg,
        &path,
        &["store: wrong type: found integer `5`, expected a table"],
    );
}
