//! Logging: the subscriber set-up, the shared field names and the event
//! names.
//!
//! Every log line an operator may filter on carries the ids as fields of the
//! event itself (not only of a span), so they are top-level keys of the JSON
//! line, and its kind in the `event` field:
//!
//! ```
//! use pecgate::telemetry::event;
//! let id = "01JDQ3Z6N0000000000000000";
//! tracing::info!(event = event::DISPATCH_SUBMITTED, dispatch_id = %id, mailbox = "protocollo", "submitted");
//! ```
//!
//! Messages are literal strings; values go in fields. Names come from
//! [`field`] (the glossary of DESIGN.md) and [`event`]. The `tracing` macros
//! need field names as identifiers, so the constants are the reference that
//! code and tests are checked against, not something to interpolate.
//!
//! Never log passwords, message bodies or attachments. Under journald no
//! timestamps are added (journald has its own). `RUST_LOG` is not read: the
//! filter comes from the caller (`--log-level`, else the configuration).

use std::io::IsTerminal;

use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Field names shared by every part of pecgate (DESIGN.md, "Names that
/// several parts share"). Use exactly these names.
pub mod field {
    /// What happened: one of the [`super::event`] names.
    pub const EVENT: &str = "event";
    /// The gateway's id of a dispatch (a letter sent to its recipients).
    pub const DISPATCH_ID: &str = "dispatch_id";
    /// The configured name of a mailbox (`[mailbox.NAME]`).
    pub const MAILBOX: &str = "mailbox";
    /// An RFC 5322 Message-ID, with angle brackets.
    pub const MESSAGE_ID: &str = "message_id";
    /// The provider's `identificativo` of a PEC transport message.
    pub const IDENTIFICATIVO: &str = "identificativo";
    /// One recipient address.
    pub const RECIPIENT: &str = "recipient";
    /// The PEC classification of a message (or a document's kind).
    pub const KIND: &str = "kind";
    /// An IMAP UID.
    pub const UID: &str = "uid";
    /// A file or folder.
    pub const PATH: &str = "path";
    /// The error, formatted with `{:#}` (whole chain on one line).
    pub const ERROR: &str = "error";

    /// Every name above, for tests that check the glossary.
    pub const ALL: &[&str] = &[
        EVENT,
        DISPATCH_ID,
        MAILBOX,
        MESSAGE_ID,
        IDENTIFICATIVO,
        RECIPIENT,
        KIND,
        UID,
        PATH,
        ERROR,
    ];
}

/// Values of the `event` field: what happened, as `subject.what`. An
/// operator greps or alerts on these, so they never change once released.
pub mod event {
    // Daemon lifecycle.
    /// The daemon finished starting and serves its mailboxes (info).
    pub const DAEMON_STARTED: &str = "daemon.started";
    /// A stop signal arrived; work in progress is draining (info).
    pub const DAEMON_STOPPING: &str = "daemon.stopping";
    /// Everything drained; the process exits (info).
    pub const DAEMON_STOPPED: &str = "daemon.stopped";
    /// The configuration was loaded at start (info).
    pub const CONFIG_LOADED: &str = "config.loaded";
    /// SIGHUP: the new configuration is in effect (info).
    pub const CONFIG_RELOADED: &str = "config.reloaded";
    /// SIGHUP: the new configuration was refused, the old one stays (error).
    pub const CONFIG_RELOAD_FAILED: &str = "config.reload_failed";

    // Outbox.
    /// A letter file was claimed from an outbox (info).
    pub const LETTER_CLAIMED: &str = "letter.claimed";
    /// A letter was refused and moved to `outbox/rejected/` (warn: a clerk
    /// must fix it).
    pub const LETTER_REJECTED: &str = "letter.rejected";

    // Dispatches.
    /// A dispatch was recorded and waits for its turn (info).
    pub const DISPATCH_QUEUED: &str = "dispatch.queued";
    /// The provider accepted the submission over SMTP (info).
    pub const DISPATCH_SUBMITTED: &str = "dispatch.submitted";
    /// The provider refused the submission (SMTP 5xx) (error).
    pub const DISPATCH_REFUSED: &str = "dispatch.refused";
    /// A temporary SMTP failure; the submission will be retried (warn).
    pub const DISPATCH_RETRY: &str = "dispatch.retry";
    /// The connection broke after DATA: the outcome is unknown until a
    /// receipt arrives or the grace period ends (warn).
    pub const DISPATCH_UNCERTAIN: &str = "dispatch.uncertain";
    /// Every recipient has a final outcome (info).
    pub const DISPATCH_FINAL: &str = "dispatch.final";

    // Receipts (ricevute) and incoming mail.
    /// Ricevuta di accettazione (info).
    pub const RECEIPT_ACCEPTED: &str = "receipt.accepted";
    /// Avviso di non accettazione (error).
    pub const RECEIPT_NOT_ACCEPTED: &str = "receipt.not_accepted";
    /// Ricevuta di avvenuta consegna for one recipient (info).
    pub const RECEIPT_DELIVERED: &str = "receipt.delivered";
    /// Avviso di mancata consegna / errore di consegna (error).
    pub const RECEIPT_FAILED: &str = "receipt.failed";
    /// Preavviso di mancata consegna (warn).
    pub const RECEIPT_WARNING: &str = "receipt.warning";
    /// Presa in carico between providers (debug/info).
    pub const RECEIPT_TAKEN_IN_CHARGE: &str = "receipt.taken_in_charge";
    /// A receipt that matches no dispatch (warn).
    pub const RECEIPT_UNMATCHED: &str = "receipt.unmatched";
    /// A message whose signature or structure failed the checks, kept aside
    /// (error: evidence at risk).
    pub const RECEIPT_QUARANTINED: &str = "receipt.quarantined";
    /// A receipt named an attempt the store had lost (restore from backup):
    /// the attempt was recorded again so that the letter is not resent
    /// (warn).
    pub const ATTEMPT_RECOVERED: &str = "attempt.recovered";
    /// Incoming certified mail (posta certificata) unpacked into inbox/
    /// (info).
    pub const MESSAGE_RECEIVED: &str = "message.received";
    /// Raw bytes written to the archive (debug).
    pub const MESSAGE_ARCHIVED: &str = "message.archived";

    // Verification and inspection (also used by the `verify` / `inspect`
    // commands).
    /// A message was classified and parsed (debug).
    pub const MESSAGE_INSPECTED: &str = "message.inspected";
    /// A file could not be read or is not a mail message (warn).
    pub const MESSAGE_UNREADABLE: &str = "message.unreadable";
    /// The signature verified and chains to a PEC anchor (debug).
    pub const SIGNATURE_VALID: &str = "signature.valid";
    /// The signature did not verify, or the signer is not a PEC provider
    /// (warn).
    pub const SIGNATURE_INVALID: &str = "signature.invalid";

    // Mailboxes (IMAP/SMTP sessions).
    /// Logged in to the server (info).
    pub const MAILBOX_CONNECTED: &str = "mailbox.connected";
    /// The session ended; a reconnect follows with backoff (warn).
    pub const MAILBOX_DISCONNECTED: &str = "mailbox.disconnected";
    /// The server refused the credentials (error: someone must act).
    pub const MAILBOX_AUTH_REFUSED: &str = "mailbox.auth_refused";
    /// Quota use above `quota_warn_percent` (warn).
    pub const MAILBOX_QUOTA_HIGH: &str = "mailbox.quota_high";
    /// UIDVALIDITY changed; the folder is resynchronised (warn).
    pub const MAILBOX_UIDVALIDITY_CHANGED: &str = "mailbox.uidvalidity_changed";
    /// Retention moved or expunged old messages (info).
    pub const MAILBOX_RETENTION: &str = "mailbox.retention";

    // Deadlines, store, backup.
    /// A dispatch is overdue for a receipt (warn).
    pub const DEADLINE_STALE: &str = "deadline.stale";
    /// A submitted letter has no acceptance within the configured minutes
    /// (warn: the provider may be slow or the message lost).
    pub const DEADLINE_ACCEPTANCE_OVERDUE: &str = "deadline.acceptance_overdue";
    /// An uncertain letter had no acceptance after the grace period, with
    /// the mailbox read past it: sent once more with a new Message-ID (warn).
    pub const DISPATCH_GRACE_RESEND: &str = "dispatch.grace_resend";
    /// An operator decided about an uncertain letter with `pecgate resolve`
    /// (info; logged by the command, recorded in the store).
    pub const DISPATCH_RESOLVED: &str = "dispatch.resolved";
    /// The IMAP folder was read up to its newest message (debug).
    pub const MAILBOX_SYNCED: &str = "mailbox.synced";
    /// The database schema was migrated (info).
    pub const STORE_MIGRATED: &str = "store.migrated";
    /// A scheduled backup was written (info).
    pub const BACKUP_COMPLETED: &str = "backup.completed";
    /// A scheduled backup failed (error).
    pub const BACKUP_FAILED: &str = "backup.failed";
    /// `pecgate reindex` rebuilt the database from the sent folders and the
    /// archive (info; also the last event of the rebuilt log).
    pub const STORE_REINDEXED: &str = "store.reindexed";
    /// `pecgate reindex` could not restore a file as recorded (warn: listed
    /// in its report, exit status 1).
    pub const REINDEX_PROBLEM: &str = "reindex.problem";

    /// Every name above, for tests that check names are unique and well
    /// formed.
    pub const ALL: &[&str] = &[
        DAEMON_STARTED,
        DAEMON_STOPPING,
        DAEMON_STOPPED,
        CONFIG_LOADED,
        CONFIG_RELOADED,
        CONFIG_RELOAD_FAILED,
        LETTER_CLAIMED,
        LETTER_REJECTED,
        DISPATCH_QUEUED,
        DISPATCH_SUBMITTED,
        DISPATCH_REFUSED,
        DISPATCH_RETRY,
        DISPATCH_UNCERTAIN,
        DISPATCH_FINAL,
        RECEIPT_ACCEPTED,
        RECEIPT_NOT_ACCEPTED,
        RECEIPT_DELIVERED,
        RECEIPT_FAILED,
        RECEIPT_WARNING,
        RECEIPT_TAKEN_IN_CHARGE,
        RECEIPT_UNMATCHED,
        RECEIPT_QUARANTINED,
        ATTEMPT_RECOVERED,
        MESSAGE_RECEIVED,
        MESSAGE_ARCHIVED,
        MESSAGE_INSPECTED,
        MESSAGE_UNREADABLE,
        SIGNATURE_VALID,
        SIGNATURE_INVALID,
        MAILBOX_CONNECTED,
        MAILBOX_DISCONNECTED,
        MAILBOX_AUTH_REFUSED,
        MAILBOX_QUOTA_HIGH,
        MAILBOX_UIDVALIDITY_CHANGED,
        MAILBOX_RETENTION,
        DEADLINE_STALE,
        DEADLINE_ACCEPTANCE_OVERDUE,
        DISPATCH_GRACE_RESEND,
        DISPATCH_RESOLVED,
        MAILBOX_SYNCED,
        STORE_MIGRATED,
        BACKUP_COMPLETED,
        BACKUP_FAILED,
        STORE_REINDEXED,
        REINDEX_PROBLEM,
    ];
}

/// The concrete output chosen for a [`LogFormat`] in a given environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// JSON lines (true) or human-readable lines (false).
    pub json: bool,
    /// Whether lines carry a timestamp (not under journald, which adds its
    /// own).
    pub timestamps: bool,
    /// Whether human lines use colours (only on a terminal).
    pub ansi: bool,
}

/// What the process knows about where its stderr goes: the inputs of
/// [`resolve_format`], gathered by [`Surroundings::detect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surroundings {
    /// `$JOURNAL_STREAM` (`DEVICE:INODE` of the journal's stream socket),
    /// set by systemd when stdout or stderr goes to the journal.
    pub journal_stream: Option<String>,
    /// Device and inode numbers of stderr (`fstat`), if it could be read.
    pub stderr_id: Option<(u64, u64)>,
    /// `$INVOCATION_ID` is set: the process is a systemd service.
    pub under_systemd: bool,
    /// stderr is a terminal.
    pub stderr_is_tty: bool,
}

impl Surroundings {
    /// Reads the environment and stderr of this process.
    pub fn detect() -> Surroundings {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let stderr = std::io::stderr();
        // fstat on a duplicate of fd 2 (no unsafe code needed).
        let stderr_id = stderr
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        Surroundings {
            journal_stream: std::env::var("JOURNAL_STREAM").ok(),
            stderr_id,
            under_systemd: std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty()),
            stderr_is_tty: stderr.is_terminal(),
        }
    }

    /// stderr is connected to journald: `$JOURNAL_STREAM` names stderr's
    /// device and inode (systemd.exec(5)). A `JOURNAL_STREAM` inherited by
    /// a process whose stderr was redirected elsewhere does not count.
    pub fn stderr_is_journal(&self) -> bool {
        let (Some(stream), Some((dev, ino))) = (&self.journal_stream, self.stderr_id) else {
            return false;
        };
        let Some((d, i)) = stream.trim().split_once(':') else {
            return false;
        };
        d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
    }
}

/// Decides the output. An explicit `json` / `human` (from `--log-format`,
/// `PECGATE_LOG_FORMAT` or the configuration) wins; `auto` means JSON when
/// stderr goes to the journal, when running as a systemd service
/// (`INVOCATION_ID`), or when stderr is not a terminal (a pipe, a file), and
/// human-readable lines at a terminal. No timestamps when stderr is the
/// journal (it stamps every line itself); colours only at a terminal. Pure,
/// so it is tested without a terminal or a journal.
pub fn resolve_format(fmt: LogFormat, env: &Surroundings) -> Resolved {
    let journal = env.stderr_is_journal();
    let json = match fmt {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => journal || env.under_systemd || !env.stderr_is_tty,
    };
    Resolved {
        json,
        timestamps: !journal,
        ansi: !json && env.stderr_is_tty && !journal,
    }
}

/// The JSON layer: one object per line, the event's fields at the top level
/// (`flatten_event`), no span fields, target kept. Used by [`init`] and by
/// the tests, so the tests check the real configuration.
pub fn json_layer<S, W>(writer: W, timestamps: bool) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(true)
        .with_writer(writer);
    if timestamps {
        layer.boxed()
    } else {
        layer.without_time().boxed()
    }
}

/// The human layer: readable lines, target kept, colours only on a
/// terminal, no timestamps under journald.
pub fn human_layer<S, W>(
    writer: W,
    timestamps: bool,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(writer);
    if timestamps {
        layer.boxed()
    } else {
        layer.without_time().boxed()
    }
}

/// Installs the global subscriber: `filter` (an `EnvFilter` directive such as
/// `info` or `pecgate=debug,warn`) and the format resolved by
/// [`resolve_format`], writing to stderr. A second call is a no-op.
///
/// # Errors
///
/// If `filter` is not a valid directive.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| anyhow::anyhow!("log filter {filter:?}: {e}"))?;
    let r = resolve_format(format, &Surroundings::detect());
    let layer = if r.json {
        json_layer(std::io::stderr, r.timestamps)
    } else {
        human_layer(std::io::stderr, r.timestamps, r.ansi)
    };
    // Err only when a global subscriber is already set: keep the first one.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Surroundings for the format tests.
    fn env(journal: bool, invocation: bool, tty: bool) -> Surroundings {
        Surroundings {
            journal_stream: journal.then(|| "8:12345".to_owned()),
            stderr_id: Some((8, 12345)),
            under_systemd: invocation,
            stderr_is_tty: tty,
        }
    }

    #[test]
    fn auto_resolution() {
        // Under systemd with stderr to the journal: JSON, no timestamps, no
        // colours.
        let r = resolve_format(LogFormat::Auto, &env(true, true, false));
        assert_eq!(
            r,
            Resolved {
                json: true,
                timestamps: false,
                ansi: false
            }
        );
        // A systemd service whose stderr goes to a file: JSON with
        // timestamps.
        let r = resolve_format(LogFormat::Auto, &env(false, true, false));
        assert_eq!(
            r,
            Resolved {
                json: true,
                timestamps: true,
                ansi: false
            }
        );
        // At a terminal: human with timestamps and colours.
        let r = resolve_format(LogFormat::Auto, &env(false, false, true));
        assert_eq!(
            r,
            Resolved {
                json: false,
                timestamps: true,
                ansi: true
            }
        );
        // Piped: JSON with timestamps.
        let r = resolve_format(LogFormat::Auto, &env(false, false, false));
        assert_eq!(
            r,
            Resolved {
                json: true,
                timestamps: true,
                ansi: false
            }
        );
        // Explicit choices win over the surroundings.
        assert!(!resolve_format(LogFormat::Human, &env(true, true, false)).json);
        assert!(!resolve_format(LogFormat::Human, &env(true, true, true)).timestamps);
        assert!(!resolve_format(LogFormat::Human, &env(true, true, true)).ansi);
        assert!(resolve_format(LogFormat::Json, &env(false, false, true)).json);
        assert!(!resolve_format(LogFormat::Json, &env(false, false, true)).ansi);
    }

    #[test]
    fn every_name_is_documented_in_the_log_schema() {
        let doc = include_str!("../docs/logging.md");
        for e in event::ALL {
            assert!(
                doc.contains(&format!("`{e}`")),
                "docs/logging.md does not describe the event {e}"
            );
        }
        for f in field::ALL {
            assert!(
                doc.contains(&format!("| `{f}` |")),
                "docs/logging.md does not describe the field {f}"
            );
        }
    }

    #[test]
    fn journal_is_recognised_only_on_stderr() {
        // JOURNAL_STREAM names stderr's device and inode.
        assert!(env(true, false, false).stderr_is_journal());
        // Inherited by a process whose stderr is now a terminal (a shell
        // started from a service): another inode, not the journal.
        let inherited = Surroundings {
            journal_stream: Some("8:99".to_owned()),
            stderr_id: Some((8, 12345)),
            under_systemd: false,
            stderr_is_tty: true,
        };
        assert!(!inherited.stderr_is_journal());
        let r = resolve_format(LogFormat::Auto, &inherited);
        assert!(!r.json && r.timestamps && r.ansi, "{r:?}");
        // Malformed or unknown values are not the journal.
        for bad in ["", "8", "8:x", "x:12345", "8:12345:1"] {
            let e = Surroundings {
                journal_stream: Some(bad.to_owned()),
                ..env(false, false, false)
            };
            assert!(!e.stderr_is_journal(), "{bad:?}");
        }
        let no_fstat = Surroundings {
            stderr_id: None,
            ..env(true, false, true)
        };
        assert!(!no_fstat.stderr_is_journal());
        // Detection on this process does not fail (whatever stderr is).
        let _ = Surroundings::detect();
    }

    #[test]
    fn json_line_has_ids_at_top_level() {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(json_layer(buf.clone(), true));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", uid = 7);
            let _g = span.enter();
            tracing::info!(
                event = event::DISPATCH_SUBMITTED,
                dispatch_id = %"01JDQ3Z6N0",
                mailbox = "protocollo",
                "submitted"
            );
        });
        let text = buf.text();
        let line = text.lines().next().expect("one line");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj["event"], event::DISPATCH_SUBMITTED);
        assert_eq!(obj[field::DISPATCH_ID], "01JDQ3Z6N0");
        assert_eq!(obj[field::MAILBOX], "protocollo");
        assert_eq!(obj["message"], "submitted");
        assert_eq!(obj["level"], "INFO");
        assert!(obj.contains_key("target"));
        assert!(obj.contains_key("timestamp"));
        assert!(
            !obj.contains_key("fields"),
            "fields must be flattened: {line}"
        );
        assert!(
            !obj.contains_key("span") && !obj.contains_key("spans"),
            "{line}"
        );
    }

    #[test]
    fn json_without_timestamps() {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(json_layer(buf.clone(), false));
        tracing::subscriber::with_default(subscriber, || tracing::warn!(path = "/x", "hello"));
        let v: serde_json::Value = serde_json::from_str(buf.text().trim()).unwrap();
        assert!(v.get("timestamp").is_none());
        assert_eq!(v["path"], "/x");
    }

    #[test]
    fn human_line_without_timestamp_or_colour() {
        let buf = Buffer::default();
        let subscriber =
            tracing_subscriber::registry().with(human_layer(buf.clone(), false, false));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(event = event::DAEMON_STARTED, "started")
        });
        let text = buf.text();
        assert!(
            text.starts_with(" INFO") || text.starts_with("INFO"),
            "{text:?}"
        );
        assert!(
            text.contains("event=\"daemon.started\"") || text.contains("event=daemon.started"),
            "{text:?}"
        );
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for e in event::ALL {
            assert!(seen.insert(*e), "duplicate event {e}");
            let (subject, what) = e.split_once('.').expect("subject.what");
            for part in [subject, what] {
                assert!(
                    !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{e}"
                );
            }
        }
        for f in field::ALL {
            assert!(
                f.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{f}"
            );
        }
    }

    #[test]
    fn init_twice_is_harmless_and_bad_filter_fails() {
        assert!(init(LogFormat::Human, "pecgate=[").is_err());
        init(LogFormat::Json, "warn").unwrap();
        init(LogFormat::Human, "info").unwrap();
    }
}
