//! `pecgate run` in production (issue 7): sd_notify with a fake
//! `NOTIFY_SOCKET` (PID 1 here is not systemd), SIGHUP reload (a valid
//! change applied, an invalid one refused with the old configuration kept),
//! SIGTERM within the stop timeout, and the log schema: one letter followed
//! with `jq 'select(.dispatch_id=="…")'` from submission to delivery, with
//! no secret and no body in the log.
//!
//! Dovecot must be installed (see tests/sandbox_support); `jq` too
//! (scripts/setup installs it).

mod outbound_support;
#[path = "sandbox_support/mod.rs"]
mod sandbox_support;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use outbound_support::*;
use sandbox_support::{Env, MARIO, OFFICE, PAOLO, signal, within};
use serde_json::Value;

/// Collects the datagrams the daemon sends to the fake notify socket.
struct NotifySocket {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        NotifySocket {
            sock,
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `pred` (returns it) or `limit`.
    fn wait(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if pred(&msg) {
                    return msg;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} notification within {limit:?}; seen: {:?}",
                self.seen
            );
        }
    }
}

/// Drops the envelope `name` (TOML text, no documents) and waits until it
/// is the one letter in the store and delivered; returns its `list` entry.
async fn send_the_one_letter(gw: &Gateway, name: &str, envelope: &str) -> Value {
    drop_letter(&gw.outbox(), name, envelope, &[]);
    gw.wait_list("the letter delivered", Duration::from_secs(60), |l| {
        l.len() == 1 && l[0]["state"] == "delivered"
    })
    .await
    .remove(0)
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reload_and_stop() {
    within(180, async {
        let env = Env::start(3600.0, None).await;
        let sock_path = env.tmp.path().join("notify.sock");
        let mut notify = NotifySocket::bind(&sock_path);
        let sock = sock_path.to_str().unwrap().to_owned();
        let mut gw =
            Gateway::start_full(&env, &[("NOTIFY_SOCKET", &sock), ("WATCHDOG_USEC", "1000000")])
                .await;

        // READY with a STATUS line, then watchdog pings about every 0.5 s.
        let ready = notify.wait("READY", Duration::from_secs(10), |m| has_line(m, "READY=1"));
        assert!(
            ready.lines().any(|l| l.starts_with("STATUS=") && l.contains("mailbox")),
            "{ready:?}"
        );
        notify.wait("WATCHDOG", Duration::from_secs(3), |m| has_line(m, "WATCHDOG=1"));
        notify.wait("second WATCHDOG", Duration::from_secs(3), |m| {
            has_line(m, "WATCHDOG=1")
        });

        // A valid change to the mailbox (its pace): reloaded, mailbox restarted.
        let config = gw.config.clone();
        let original = fs::read_to_string(&config).unwrap();
        let changed = original.replace("per_minute = 600", "per_minute = 500");
        assert_ne!(changed, original, "the sandbox configuration sets per_minute = 600");
        fs::write(&config, &changed).unwrap();
        signal(gw.pid(), "HUP");
        notify.wait("RELOADING", Duration::from_secs(10), |m| {
            has_line(m, "RELOADING=1")
        });
        notify.wait("READY after reload", Duration::from_secs(30), |m| {
            has_line(m, "READY=1")
        });
        gw.wait_log("config.reloaded", Duration::from_secs(10), |l| {
            l["event"] == "config.reloaded" && l["restarted"].as_str().is_some_and(|r| r.contains("protocollo"))
        })
        .await;

        // An invalid configuration: refused at error level, the old one kept.
        fs::write(&config, format!("{changed}\nnonsense_key = 1\n")).unwrap();
        signal(gw.pid(), "HUP");
        gw.wait_log("config.reload_failed", Duration::from_secs(10), |l| {
            l["event"] == "config.reload_failed"
                && l["level"] == "ERROR"
                && l["error"].as_str().is_some_and(|e| e.contains("nonsense_key"))
        })
        .await;
        notify.wait("READY after the refused reload", Duration::from_secs(10), |m| {
            has_line(m, "READY=1")
        });
        assert!(gw.has_exited().is_none(), "still running: {}", gw.log_text());
        // (`pecgate list` below reads the file too.)
        fs::write(&config, &changed).unwrap();

        // ... and still works: a letter goes all the way.
        let done = send_the_one_letter(
            &gw,
            "dopo-reload.toml",
            &format!(
                "to = [\"{MARIO}\"]\nsubject = \"Dopo il reload\"\nbody = \"Testo riservato della lettera\"\nkind = \"avviso\"\n"
            ),
        )
        .await;
        assert_eq!(done["subject"], "Dopo il reload");

        // SIGTERM: STOPPING, exit 0 within the stop timeout.
        let started = Instant::now();
        let status = gw.terminate(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{}", gw.log_text());
        assert!(started.elapsed() < Duration::from_secs(30));
        notify.wait("STOPPING", Duration::from_secs(2), |m| has_line(m, "STOPPING=1"));
    })
    .await;
}

/// Runs `jq` over the daemon's log file and returns its output lines.
fn jq(filter: &str, log: &Path) -> Vec<Value> {
    let out = Command::new("jq")
        .arg("-c")
        .arg(filter)
        .arg(log)
        .output()
        .expect("jq (installed by scripts/setup)");
    assert!(
        out.status.success(),
        "jq failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("jq output is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_letter_is_followed_with_jq_from_submission_to_delivery() {
    within(180, async {
        let env = Env::start(3600.0, None).await;
        let mut gw = Gateway::start_full(&env, &[]).await;
        let body = "Contenuto personale che non deve finire nei log 7f3a";
        let done = send_the_one_letter(
            &gw,
            "seguimi.toml",
            &format!(
                "to = [\"{MARIO}\"]\ncc = [\"{PAOLO}\"]\nsubject = \"Da seguire nei log\"\nbody = \"{body}\"\nkind = \"raccomandata\"\nprotocol = \"2026/0000777\"\n"
            ),
        )
        .await;
        let id = done["dispatch_id"].as_str().unwrap().to_owned();
        gw.stop_cleanly().await;

        let lines = jq(&format!("select(.dispatch_id==\"{id}\")"), &gw.log);
        let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
        let pos = |name: &str| {
            events
                .iter()
                .position(|e| *e == name)
                .unwrap_or_else(|| panic!("{name} not in the letter's log lines: {events:?}"))
        };
        // In order: queued, submitted, accepted, delivered, final.
        let order = [
            "dispatch.queued",
            "dispatch.submitted",
            "receipt.accepted",
            "receipt.delivered",
            "dispatch.final",
        ];
        for pair in order.windows(2) {
            assert!(pos(pair[0]) < pos(pair[1]), "{pair:?} out of order: {events:?}");
        }
        for l in &lines {
            assert_eq!(l["mailbox"], "protocollo", "{l}");
            assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        }
        let delivered = &lines[pos("receipt.delivered")];
        assert_eq!(delivered["recipient"], MARIO, "{delivered}");
        assert!(delivered["identificativo"].is_string(), "{delivered}");

        // Never a body or a secret.
        let text = gw.log_text();
        assert!(!text.contains(body), "the letter's body leaked into the log");
        let info: Value =
            serde_json::from_str(&fs::read_to_string(env.dir().join("sandbox.json")).unwrap())
                .unwrap();
        let mut passwords = Vec::new();
        collect_passwords(&info, &mut passwords);
        assert!(!passwords.is_empty(), "sandbox.json lists passwords");
        for p in passwords {
            assert!(!text.contains(&p), "a password leaked into the log");
        }
    })
    .await;
}

fn collect_passwords(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "password" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_owned());
                    }
                } else {
                    collect_passwords(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_passwords(x, out)),
        _ => {}
    }
}

/// A nearly full mailbox bounces citizens' mail: the daemon reads the IMAP
/// quota and raises `mailbox.quota_high` (warn) above the configured
/// percentage; `pecgate status` shows the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_raises_a_quota_warning() {
    within(120, async {
        let env = Env::start(3600.0, None).await;
        // Dovecot's quota is 1 GiB: 1 % is about 10.7 MB; one 12 MB message
        // (not PEC: archived and recorded only) passes it.
        let mut big = b"From: someone@posta.sandbox.test\r\nTo: protocollo@pec.comune.sandbox.test\r\nSubject: grande\r\nMessage-ID: <big@posta.sandbox.test>\r\n\r\n".to_vec();
        let line = [b'x'; 998];
        while big.len() < 12 * 1024 * 1024 {
            big.extend_from_slice(&line);
            big.extend_from_slice(b"\r\n");
        }
        let mut session = sandbox_support::imap_login(&env.info, OFFICE)
            .await
            .expect("IMAP login");
        session
            .append("INBOX", None, None, &big)
            .await
            .expect("APPEND");
        let _ = session.logout().await;

        let mut gw = Gateway::start_full(
            &env,
            &[("PECGATE__MAILBOX__PROTOCOLLO__IMAP__QUOTA_WARN_PERCENT", "1")],
        )
        .await;
        gw.wait_log("mailbox.quota_high", Duration::from_secs(30), |l| {
            l["event"] == "mailbox.quota_high"
                && l["level"] == "WARN"
                && l["mailbox"] == "protocollo"
                && l["used"].as_u64().is_some_and(|u| u >= 12_000_000)
                && l["limit"].as_u64() == Some(1024 * 1024 * 1024)
        })
        .await;
        // Once per crossing, not at every sync (IDLE wakes, polls).
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(gw.events("mailbox.quota_high").len(), 1, "{}", gw.log_text());
        let out = gw.command(&["status", "--json"]).await;
        assert!(out.status.success(), "{out:?}");
        let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
        let text = status.to_string();
        assert!(text.contains("1073741824"), "quota limit shown: {text}");
        gw.stop_cleanly().await;
    })
    .await;
}
