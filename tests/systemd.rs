//! The systemd integration files (`systemd/`): the unit passes
//! `systemd-analyze verify`, its exposure score (`systemd-analyze security
//! --offline=true`) stays below 2.0, the sysusers.d and tmpfiles.d files
//! make the user, group and folders they promise (applied to a temporary
//! root), and the production example configuration agrees with all three.
//!
//! PID 1 on the test machines is not systemd: `verify` and
//! `security --offline=true` work on files alone. `systemd-analyze`,
//! `systemd-sysusers` and `systemd-tmpfiles` come with Debian's `systemd`
//! package (`scripts/setup` installs it); a missing tool fails the test with
//! that instruction.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "systemd/pecgate.service";
const SYSUSERS: &str = "systemd/pecgate.sysusers";
const TMPFILES: &str = "systemd/pecgate.tmpfiles";
const PRODUCTION: &str = "config/examples/production.toml";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found: install Debian's systemd package (apt-get install systemd, or run scripts/setup)"
    );
}

/// The unit with the built binary in place of /usr/bin/pecgate, in a fresh
/// directory (verify checks that the programs exist).
fn unit_for_test() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo(UNIT)).expect("systemd/pecgate.service");
    assert!(text.contains("ExecStart=/usr/bin/pecgate run"), "{text}");
    assert!(
        text.contains("ExecStartPre=/usr/bin/pecgate check-config"),
        "{text}"
    );
    let text = text.replace("/usr/bin/pecgate", env!("CARGO_BIN_EXE_pecgate"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pecgate.service");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run systemd tool");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `systemd-analyze verify` on one unit file: (success, what it said about
/// that file). Lines about other units (the targets it pulls in) are not
/// about ours.
fn verify(path: &Path) -> (bool, Vec<String>) {
    let (ok, text) = run(Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(path)
        .current_dir(path.parent().unwrap()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let ours = text
        .lines()
        .filter(|l| l.contains(&name) || l.contains("pecgate"))
        .map(str::to_owned)
        .collect();
    (ok, ours)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let (_dir, unit) = unit_for_test();
    let (ok, said) = verify(&unit);
    assert!(ok && said.is_empty(), "systemd-analyze verify: {said:#?}");

    // The check would catch a mistake: an unknown directive is reported.
    let broken = unit.with_file_name("broken.service");
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes");
    std::fs::write(&broken, text).unwrap();
    let (_, said) = verify(&broken);
    assert!(
        said.iter().any(|l| l.contains("ProtectHomes")),
        "verify reports an unknown key: {said:#?}"
    );
}

#[test]
fn the_exposure_score_is_below_2() {
    let (_dir, unit) = unit_for_test();
    let (ok, text) = run(Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    assert!(ok, "systemd-analyze security: {text}");
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for pecgate.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{text}"));
    let score: f64 = line
        .rsplit_once(':')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("exposure: {line}");
    assert!(
        score < 2.0,
        "exposure {score} (docs/operations.md records it): {text}"
    );
    // What the hardening promises (docs/operations.md).
    for kept in [
        "✓ ProtectSystem=",
        "✓ ProtectHome=",
        "✓ PrivateTmp=",
        "✓ PrivateDevices=",
        "✓ PrivateUsers=",
        "✓ NoNewPrivileges=",
        "✓ MemoryDenyWriteExecute=",
        "✓ SystemCallArchitectures=",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "✓ RestrictAddressFamilies=~AF_PACKET",
    ] {
        assert!(text.contains(kept), "{kept} in:\n{text}");
    }
}

/// The unit's settings, key -> values (in order).
fn unit_settings() -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(repo(UNIT)).unwrap().lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            m.entry(k.to_owned()).or_default().push(v.to_owned());
        }
    }
    m
}

#[test]
fn the_unit_has_the_promised_service_settings() {
    let s = unit_settings();
    let one = |k: &str| s.get(k).map(|v| v.join(" ")).unwrap_or_default();
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("RestartPreventExitStatus"), "78");
    assert_eq!(one("UMask"), "0027");
    assert_eq!(one("User"), "pecgate");
    assert_eq!(one("Group"), "pecgate-clerks");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("ProtectSystem"), "strict");
    assert!(one("SystemCallFilter").contains("@system-service"));
    assert_eq!(one("RestrictAddressFamilies"), "AF_UNIX AF_INET AF_INET6");
}

/// Applies sysusers.d and tmpfiles.d to a temporary root (as root, the
/// owners are set too).
#[test]
fn sysusers_and_tmpfiles_make_the_folders() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let (ok, text) = run(Command::new(tool("systemd-sysusers"))
        .arg(format!("--root={}", root.path().display()))
        .arg(repo(SYSUSERS)));
    assert!(ok, "systemd-sysusers: {text}");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("pecgate:"))
        .expect("user pecgate")
        .split(':')
        .collect();
    let clerks: Vec<&str> = group
        .lines()
        .find(|l| l.starts_with("pecgate-clerks:"))
        .expect("group pecgate-clerks")
        .split(':')
        .collect();
    assert_eq!(
        user[3], clerks[2],
        "pecgate's primary group is pecgate-clerks"
    );
    assert_eq!(user[5], "/var/lib/pecgate");
    assert!(user[6].ends_with("nologin"), "{user:?}");

    let (ok, text) = run(Command::new(tool("systemd-tmpfiles"))
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo(TMPFILES)));
    let as_root = std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0);
    assert!(ok || !as_root, "systemd-tmpfiles: {text}");
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = clerks[2].parse().unwrap();
    for (path, mode, owner) in [
        ("var/lib/pecgate", 0o700, Some((uid, gid))),
        ("var/lib/pecgate/archive", 0o700, Some((uid, gid))),
        ("var/backups/pecgate", 0o700, Some((uid, gid))),
        ("etc/pecgate/credentials", 0o700, Some((0, 0))),
        ("srv/pecgate", 0o750, Some((uid, gid))),
        ("srv/pecgate/protocollo/outbox", 0o2770, Some((uid, gid))),
        ("srv/pecgate/protocollo/sent", 0o2750, Some((uid, gid))),
        ("srv/pecgate/protocollo/inbox", 0o2750, Some((uid, gid))),
    ] {
        let m = std::fs::metadata(root.path().join(path))
            .unwrap_or_else(|e| panic!("{path}: {e} ({text})"));
        assert!(m.is_dir(), "{path}");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{path}: mode");
        if as_root && let Some((u, g)) = owner {
            assert_eq!((m.uid(), m.gid()), (u, g), "{path}: owner");
        }
    }
}

#[test]
fn the_production_example_agrees_with_the_units() {
    let text = std::fs::read_to_string(repo(PRODUCTION)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("password");
    std::fs::write(&pw, "x\n").unwrap();
    let pw = pw.display().to_string();
    // The passwords are systemd credentials from /etc/pecgate/credentials
    // (LoadCredential=password:DIR names them password_FILE).
    let settings = unit_settings();
    assert_eq!(
        settings["LoadCredential"],
        ["password:/etc/pecgate/credentials"]
    );
    let mut env = Vec::new();
    let mut mailboxes = Vec::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("[mailbox.")
            .and_then(|r| r.strip_suffix(']'))
        {
            mailboxes.push(name.to_owned());
            for proto in ["SMTP", "IMAP"] {
                env.push((
                    format!(
                        "PECGATE__MAILBOX__{}__{proto}__PASSWORD_FILE",
                        name.to_uppercase()
                    ),
                    pw.clone(),
                ));
            }
        }
        if line.contains("password_file") {
            assert!(
                line.contains("password_file = \"/run/credentials/pecgate.service/password_"),
                "{line}"
            );
        }
    }
    assert!(!mailboxes.is_empty());
    let config = pecgate::config::Config::load_with_env(&repo(PRODUCTION), env)
        .unwrap_or_else(|e| panic!("{e}"));

    // Every folder the daemon writes is inside ReadWritePaths=.
    let writable: Vec<PathBuf> = settings["ReadWritePaths"]
        .join(" ")
        .split_whitespace()
        .map(|p| PathBuf::from(p.trim_start_matches('-')))
        .collect();
    let inside = |p: &Path| writable.iter().any(|w| p.starts_with(w));
    let mut written = vec![
        config.store.database.parent().unwrap().to_path_buf(),
        config.store.archive.clone(),
    ];
    written.extend(config.backup.iter().map(|b| b.dir.clone()));
    for m in config.mailboxes.values() {
        written.extend([m.outbox.clone(), m.sent.clone(), m.inbox.clone()]);
    }
    for p in &written {
        assert!(
            inside(p),
            "{} outside ReadWritePaths {writable:?}",
            p.display()
        );
    }
    // systemd waits longer than the daemon lets work finish after SIGTERM.
    let stop: u64 = settings["TimeoutStopSec"][0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop > config.gateway.stop_timeout.as_secs() + 10,
        "TimeoutStopSec={stop} vs gateway.stop_timeout_seconds"
    );
    // StateDirectory=pecgate is the store's folder.
    assert_eq!(settings["StateDirectory"], ["pecgate"]);
    assert_eq!(
        config.store.database.parent().unwrap(),
        Path::new("/var/lib/pecgate")
    );

    // Every mailbox folder is made by tmpfiles.d with the clerks' modes.
    let tmpfiles = std::fs::read_to_string(repo(TMPFILES)).unwrap();
    let declared = |p: &Path, mode: &str| {
        tmpfiles.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5 && f[0] == "d" && Path::new(f[1]) == p && f[2] == mode
        })
    };
    for m in config.mailboxes.values() {
        assert!(declared(&m.outbox, "2770"), "{}", m.outbox.display());
        assert!(declared(&m.sent, "2750"), "{}", m.sent.display());
        assert!(declared(&m.inbox, "2750"), "{}", m.inbox.display());
    }
    assert!(declared(&config.store.archive, "0700"));
    if let Some(b) = &config.backup {
        assert!(declared(&b.dir, "0700"));
    }
}
