//! The configuration of the whole product: what the file says ([`RawConfig`])
//! and what the daemon runs with ([`Config`]).
//!
//! Loading happens in two stages, like ripgrep's `LowArgs` -> `HiArgs`:
//!
//! 1. [`RawConfig`] mirrors the TOML file exactly (every struct is
//!    `deny_unknown_fields`, every key optional so that a missing key is
//!    reported by stage 2 together with the other problems). The `config`
//!    crate merges the file with `PECGATE__...` environment overrides, and
//!    `serde_path_to_error` names the dotted key of any unknown key or wrong
//!    type.
//! 2. [`Config`] is the validated result: absolute paths (relative ones are
//!    resolved against the directory of the configuration file), defaults
//!    applied, ports in range, addresses checked and lowercased, passwords
//!    loaded from `password_file` / `password_env` into [`Secret`]s.
//!
//! Invariants: every error names the file and the dotted key and says what is
//! wrong ([`ConfigError`]); no password is ever printed (`Secret`'s `Debug`
//! and `Display` print `Secret(***)`); tests never touch the process
//! environment ([`Config::load_with_env`]).
//!
//! Environment overrides: `PECGATE__SECTION__KEY=value`, `__` between levels,
//! e.g. `PECGATE__MAILBOX__PROTOCOLLO__SMTP__PORT=587` or
//! `PECGATE__DEADLINES__DELIVERY_HOURS=2`. Values that look like booleans or
//! numbers are parsed as such. Lists (`trust.anchors`, `blocked_extensions`)
//! cannot be overridden from the environment. `PECGATE_CONFIG` (one
//! underscore) names the file and is never read as a key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jiff::SignedDuration;
use serde::Deserialize;

/// The file read when neither `--config` nor `PECGATE_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/pecgate/pecgate.toml";

/// The environment variable that names the configuration file.
pub const CONFIG_ENV: &str = "PECGATE_CONFIG";

/// Prefix of the environment variables that override keys of the file
/// (followed by `__`, with `__` between levels).
pub const ENV_PREFIX: &str = "PECGATE";

/// Separator between the prefix and the key, and between levels of the key.
pub const ENV_SEPARATOR: &str = "__";

/// Extensions refused as attachments unless a mailbox says otherwise
/// (executables and scripts that a recipient's mail client could run).
pub const DEFAULT_BLOCKED_EXTENSIONS: &[&str] = &[
    "exe", "bat", "js", "vbs", "scr", "jar", "msi", "com", "cmd", "pif", "cpl", "hta", "wsf", "lnk",
];

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why the configuration could not be loaded. `main` maps every variant to
/// exit status 78 (EX_CONFIG). Each message names the file and, where there
/// is one, the dotted key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file does not exist.
    #[error(
        "no configuration file: {} does not exist (use --config FILE or {CONFIG_ENV} to name another file)",
        path.display()
    )]
    NotFound {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("{}: cannot read the configuration file: {}", path.display(), io_message(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML (the message shows the line and column),
    /// or the environment overrides could not be collected.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// The file is valid TOML but says something wrong: one line per problem,
    /// each `FILE: KEY: what is wrong`.
    #[error("{}", display_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in the order found (at least one).
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The configuration file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotFound { path }
            | Self::Read { path, .. }
            | Self::Syntax { path, .. }
            | Self::Invalid { path, .. } => path,
        }
    }

    /// The problems of an [`ConfigError::Invalid`] error (empty otherwise).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// One thing wrong in the configuration: the dotted key and what is wrong
/// with it (and, when the value came from the environment, which variable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `mailbox.protocollo.smtp.port`.
    pub key: String,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn display_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect();
    lines.join("\n")
}

/// `io::Error`'s message without the trailing " (os error N)".
fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

// ---------------------------------------------------------------------------
// Secret
// ---------------------------------------------------------------------------

/// A password. `Debug` and `Display` print `Secret(***)`, never the value, so
/// that a `Config` can be logged or printed with `{:?}` safely.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value (tests, and the loader).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that needs it (SMTP/IMAP login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

// ---------------------------------------------------------------------------
// Enums shared with the command line
// ---------------------------------------------------------------------------

/// How log lines are written (see `telemetry::resolve_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// JSON under systemd (`JOURNAL_STREAM` naming stderr, or
    /// `INVOCATION_ID` set) or when stderr is not a terminal,
    /// human-readable otherwise.
    #[default]
    Auto,
    /// One JSON object per line, fields at the top level.
    Json,
    /// Readable lines for a person at a terminal.
    Human,
}

impl LogFormat {
    /// The spelling used in the file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Json => "json",
            Self::Human => "human",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "json" => Ok(Self::Json),
            "human" => Ok(Self::Human),
            other => Err(format!(
                "{other:?} is not a log format (expected one of: auto, json, human)"
            )),
        }
    }
}

/// How the connection to a provider's server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS from the first byte (SMTPS 465, IMAPS 993): what PEC providers use.
    Implicit,
    /// Plain connection upgraded with STARTTLS (SMTP 587, IMAP 143).
    StartTls,
    /// No TLS at all: only for a local test server; the password travels in
    /// clear.
    InsecurePlaintext,
}

impl TlsMode {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Implicit => "implicit",
            Self::StartTls => "starttls",
            Self::InsecurePlaintext => "insecure-plaintext",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "implicit" => Ok(Self::Implicit),
            "starttls" => Ok(Self::StartTls),
            "insecure-plaintext" => Ok(Self::InsecurePlaintext),
            other => Err(format!(
                "{other:?} is not a TLS mode (expected one of: implicit, starttls, insecure-plaintext)"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Stage 1: what the file says
// ---------------------------------------------------------------------------

/// The file as written (merged with environment overrides), before any
/// check. Every key is optional here so that stage 2 can report all missing
/// keys at once; unknown keys are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[gateway]`: identity of this installation.
    pub gateway: Option<RawGateway>,
    /// `[store]`: where the database and the archive live (required).
    pub store: Option<RawStore>,
    /// `[trust]`: PEC trust anchors.
    pub trust: Option<RawTrust>,
    /// `[outbox]`: how outbox folders are watched.
    pub outbox: Option<RawOutbox>,
    /// `[deadlines]`: when a missing receipt becomes overdue.
    pub deadlines: Option<RawDeadlines>,
    /// `[logging]`: log filter and format.
    pub logging: Option<RawLogging>,
    /// `[report]`: figures used by reports.
    pub report: Option<RawReport>,
    /// `[backup]`: scheduled backups (absent: none).
    pub backup: Option<RawBackup>,
    /// `[mailbox.NAME]`: the certified mailboxes (at least one).
    pub mailbox: Option<BTreeMap<String, RawMailbox>>,
}

/// `[gateway]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// Right-hand side of generated Message-IDs.
    pub hostname: Option<String>,
    /// Seconds `pecgate run` waits for work in progress after SIGTERM.
    pub stop_timeout_seconds: Option<f64>,
}

/// `[store]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// SQLite database file.
    pub database: Option<String>,
    /// Content-addressed archive of raw messages.
    pub archive: Option<String>,
}

/// `[trust]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    /// Directories of certificates; a single string is accepted too.
    pub anchors: Option<OneOrMany>,
}

/// A list of strings that may also be written as a single string
/// (`anchors = "/dir"` as well as `anchors = ["/dir"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[outbox]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    /// Seconds a file must stay unchanged to count as complete.
    pub settle_seconds: Option<f64>,
    /// Seconds between full rescans (a safety net under file notifications).
    pub rescan_seconds: Option<f64>,
}

/// `[deadlines]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadlines {
    /// Minutes to wait for the acceptance receipt.
    pub acceptance_minutes: Option<f64>,
    /// Hours to wait for the delivery receipts.
    pub delivery_hours: Option<f64>,
    /// Minutes an uncertain submission waits before it is looked into.
    pub uncertain_grace_minutes: Option<f64>,
}

/// `[logging]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// A tracing `EnvFilter` directive.
    pub level: Option<String>,
    /// `auto`, `json` or `human`.
    pub format: Option<String>,
}

/// `[report]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// Price in euro of one registered letter with return receipt replaced.
    pub unit_price_eur: Option<f64>,
}

/// `[backup]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    /// Directory that receives the backups.
    pub dir: Option<String>,
    /// Hours between backups.
    pub every_hours: Option<f64>,
    /// How many backups to keep.
    pub keep: Option<i64>,
}

/// `[mailbox.NAME]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMailbox {
    /// The certified address.
    pub address: Option<String>,
    /// Folder where clerks drop letters.
    pub outbox: Option<String>,
    /// Folder where sent letters and their receipts are filed.
    pub sent: Option<String>,
    /// Folder where incoming certified mail is unpacked.
    pub inbox: Option<String>,
    /// Outgoing server.
    pub smtp: Option<RawSmtp>,
    /// Incoming server.
    pub imap: Option<RawImap>,
    /// Sending rate.
    pub pace: Option<RawPace>,
    /// What a letter may contain.
    pub limits: Option<RawLimits>,
    /// What happens to old messages on the server.
    pub retention: Option<RawRetention>,
}

/// `smtp = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    /// Server host name.
    pub host: Option<String>,
    /// Server port.
    pub port: Option<i64>,
    /// `implicit`, `starttls` or `insecure-plaintext`.
    pub tls: Option<String>,
    /// Login name (default: the mailbox address).
    pub username: Option<String>,
    /// File holding the password.
    pub password_file: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// PEM file of a private CA to trust.
    pub ca_file: Option<String>,
    /// Seconds before a network operation is abandoned.
    pub timeout_seconds: Option<f64>,
}

/// `imap = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImap {
    /// Server host name.
    pub host: Option<String>,
    /// Server port.
    pub port: Option<i64>,
    /// `implicit`, `starttls` or `insecure-plaintext`.
    pub tls: Option<String>,
    /// Login name (default: the mailbox address).
    pub username: Option<String>,
    /// File holding the password.
    pub password_file: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// PEM file of a private CA to trust.
    pub ca_file: Option<String>,
    /// Seconds before a network operation is abandoned.
    pub timeout_seconds: Option<f64>,
    /// Folder the receipts arrive in.
    pub folder: Option<String>,
    /// Whether to wait with IDLE between polls.
    pub idle: Option<bool>,
    /// Seconds between polls.
    pub poll_seconds: Option<f64>,
    /// Open the folder read-only (EXAMINE).
    pub read_only: Option<bool>,
    /// Quota use, in percent, above which a warning is logged.
    pub quota_warn_percent: Option<i64>,
}

impl RawImap {
    /// The keys IMAP shares with SMTP.
    fn server(&self) -> RawSmtp {
        RawSmtp {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls.clone(),
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            ca_file: self.ca_file.clone(),
            timeout_seconds: self.timeout_seconds,
        }
    }
}

/// `pace = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPace {
    /// Messages per minute at most.
    pub per_minute: Option<i64>,
    /// Messages per day at most.
    pub per_day: Option<i64>,
}

/// `limits = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Recipients (to + cc) of one letter at most.
    pub max_recipients: Option<i64>,
    /// Total size in bytes of one letter's documents at most.
    pub max_total_bytes: Option<i64>,
    /// Refused attachment extensions.
    pub blocked_extensions: Option<Vec<String>>,
}

/// `retention = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    /// Age in days after which a message is handled.
    pub after_days: Option<i64>,
    /// `move` or `expunge`.
    pub action: Option<String>,
    /// Destination folder of `move`.
    pub folder: Option<String>,
}

// ---------------------------------------------------------------------------
// Stage 2: what the daemon runs with
// ---------------------------------------------------------------------------

/// The validated configuration. Paths are absolute, defaults are applied and
/// passwords are loaded. Build it with [`Config::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Identity of this installation.
    pub gateway: GatewayConfig,
    /// Where state and evidence are kept.
    pub store: StoreConfig,
    /// Which certificates PEC signatures must chain to.
    pub trust: TrustConfig,
    /// How outbox folders are watched.
    pub outbox: OutboxConfig,
    /// When a missing receipt becomes overdue.
    pub deadlines: Deadlines,
    /// Log filter and format from the file (the command line wins).
    pub logging: LoggingConfig,
    /// Figures for reports.
    pub report: ReportConfig,
    /// Scheduled backups; `None` when the file has no `[backup]`.
    pub backup: Option<BackupConfig>,
    /// The certified mailboxes by name, iterated in name order (never empty).
    pub mailboxes: BTreeMap<String, MailboxConfig>,
}

/// `[gateway]`: identity of this installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Right-hand side of the Message-IDs the gateway generates
    /// (`<dispatch-id.random@HOSTNAME>`), lowercase. Default: the machine's
    /// host name, else `localhost`.
    pub hostname: String,
    /// After SIGTERM/SIGINT, how long `pecgate run` lets work in progress
    /// (an SMTP transaction, an ingest) finish before exiting anyway.
    /// Default 30 s (keep it below the unit's `TimeoutStopSec`).
    pub stop_timeout: Duration,
}

/// `[store]`: where state and evidence are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The SQLite database: dispatches, receipts, the append-only event log.
    pub database: PathBuf,
    /// The content-addressed archive of every raw message sent or received:
    /// the evidence, and what `reindex` rebuilds the database from.
    pub archive: PathBuf,
}

/// `[trust]`: which certificates PEC signatures must chain to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustConfig {
    /// Directories of PEM/DER certificates (existing directories). Empty:
    /// use the anchors built into the binary.
    pub anchors: Vec<PathBuf>,
}

/// `[outbox]`: how outbox folders are watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// A file unchanged this long counts as completely written (clerks copy
    /// large documents over SMB). Default 5 s.
    pub settle: Duration,
    /// Interval of the full rescan that backs up file notifications (which
    /// network file systems do not always deliver). Default 30 s.
    pub rescan: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(5),
            rescan: Duration::from_secs(30),
        }
    }
}

/// `[deadlines]`: how long the gateway waits for each receipt before the
/// dispatch is flagged as overdue ("stale").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    /// Wait for the acceptance receipt (ricevuta di accettazione) after
    /// submission. Default 30 minutes.
    pub acceptance: SignedDuration,
    /// Wait for the delivery receipts (ricevute di avvenuta consegna) after
    /// acceptance; the PEC rules allow providers 24 hours. Default 26 hours.
    pub delivery: SignedDuration,
    /// After a submission whose outcome is unknown (connection lost after
    /// DATA), wait this long for an acceptance receipt before reporting it
    /// as uncertain. Default 15 minutes.
    pub uncertain_grace: SignedDuration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            acceptance: SignedDuration::from_mins(30),
            delivery: SignedDuration::from_hours(26),
            uncertain_grace: SignedDuration::from_mins(15),
        }
    }
}

impl Deadlines {
    /// The same deadlines as the pure core's rules
    /// ([`crate::pec::policy::Deadlines`]).
    pub fn rules(&self) -> crate::pec::policy::Deadlines {
        crate::pec::policy::Deadlines {
            acceptance: self.acceptance,
            delivery: self.delivery,
            uncertain_grace: self.uncertain_grace,
        }
    }

    /// The shortest of the three, as a std `Duration` (for timers).
    pub fn shortest_std(&self) -> Duration {
        self.acceptance_std()
            .min(self.delivery_std())
            .min(self.uncertain_grace_std())
    }

    /// [`Deadlines::acceptance`] as a std `Duration` (for timers).
    pub fn acceptance_std(&self) -> Duration {
        unsigned(self.acceptance)
    }

    /// [`Deadlines::delivery`] as a std `Duration` (for timers).
    pub fn delivery_std(&self) -> Duration {
        unsigned(self.delivery)
    }

    /// [`Deadlines::uncertain_grace`] as a std `Duration` (for timers).
    pub fn uncertain_grace_std(&self) -> Duration {
        unsigned(self.uncertain_grace)
    }
}

/// Validated deadlines are positive; a negative one (built by hand) counts
/// as zero.
fn unsigned(d: SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// `[logging]`: defaults for logging; `--log-level` / `--log-format` win.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// A tracing `EnvFilter` directive (`info`, `pecgate=debug,info`),
    /// checked at load time. Default `info`.
    pub level: String,
    /// Output format. Default `auto`.
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            format: LogFormat::Auto,
        }
    }
}

/// `[report]`: figures for the reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportConfig {
    /// Price of one raccomandata A/R that a PEC message replaces, in euro
    /// cents (the file says `unit_price_eur = 5.40`); `pecgate report`
    /// multiplies it by the number of delivered certified recipients (one
    /// raccomandata each). Default 540.
    pub unit_price_cents: u64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            unit_price_cents: 540,
        }
    }
}

/// `[backup]`: scheduled backups (see `crate::backup::run_scheduled`): a
/// consistent copy of the database plus the archive, sent and inbox folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// Directory that receives the backups (absolute).
    pub dir: PathBuf,
    /// Interval between backups. Default 24 hours.
    pub every: Duration,
    /// Number of backups kept; older ones are deleted. Default 14.
    pub keep: u32,
}

/// `[mailbox.NAME]`: one certified mailbox and its clerks' folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    /// The table's name (`[a-z0-9_-]+`): appears in logs (`mailbox` field)
    /// and in the database.
    pub name: String,
    /// The certified address, lowercase: the sender of every letter, and the
    /// address receipts are matched against.
    pub address: String,
    /// Folder where clerks drop letters to send.
    pub outbox: PathBuf,
    /// Folder where sent letters are filed with their receipts.
    pub sent: PathBuf,
    /// Folder where incoming certified mail is unpacked.
    pub inbox: PathBuf,
    /// The provider's submission server.
    pub smtp: ServerConfig,
    /// The provider's mailbox server.
    pub imap: ImapConfig,
    /// Sending rate (providers throttle or block bursts).
    pub pace: Pace,
    /// What one letter may contain.
    pub limits: Limits,
    /// Housekeeping of old messages on the server; `None`: leave them.
    pub retention: Option<Retention>,
}

/// How to reach and log into one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Host name or IP address.
    pub host: String,
    /// TCP port (default by protocol and TLS mode: SMTP 465/587/25, IMAP
    /// 993/143).
    pub port: u16,
    /// How the connection is secured. Default `implicit`.
    pub tls: TlsMode,
    /// A PEM file of extra CA certificates to trust (private CA of a test
    /// server or the sandbox); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Login name. Default: the mailbox address.
    pub username: String,
    /// The password, from `password_file` or `password_env`.
    pub password: Secret,
    /// Limit on each network operation (connect, command). Default 60 s.
    pub timeout: Duration,
}

/// `imap = { ... }`: the server plus how the mailbox is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapConfig {
    /// How to reach and log into the server.
    pub server: ServerConfig,
    /// Folder receipts and incoming mail arrive in. Default `INBOX`.
    pub folder: String,
    /// Wait for new mail with IDLE (re-issued before 29 minutes) instead of
    /// only polling. Default true.
    pub idle: bool,
    /// Poll interval when IDLE is off or unsupported, and the resync
    /// interval otherwise. Default 60 s.
    pub poll: Duration,
    /// Open the folder with EXAMINE and never change flags or move
    /// messages. Default true; `retention` needs false.
    pub read_only: bool,
    /// Log a warning when the quota use reaches this percentage (a full PEC
    /// mailbox refuses receipts). Default 80.
    pub quota_warn_percent: u8,
}

/// `pace = { ... }`: how fast letters are submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    /// Submissions per minute at most. Default 5.
    pub per_minute: u32,
    /// Submissions per day at most. Default 1000.
    pub per_day: u32,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            per_minute: 5,
            per_day: 1000,
        }
    }
}

/// `limits = { ... }`: what one letter may contain (checked before
/// submission, so the provider never has to refuse it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Recipients (to + cc) at most. Default 500.
    pub max_recipients: u32,
    /// Total bytes of the documents at most. Default 100 000 000.
    pub max_total_bytes: u64,
    /// Refused attachment extensions, lowercase, without the dot. Default
    /// [`DEFAULT_BLOCKED_EXTENSIONS`].
    pub blocked_extensions: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_recipients: 500,
            max_total_bytes: 100_000_000,
            blocked_extensions: DEFAULT_BLOCKED_EXTENSIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl Limits {
    /// Whether a file name ends with a blocked extension (case-insensitive;
    /// only the last extension counts: `a.pdf.exe` is blocked).
    pub fn is_blocked(&self, file_name: &str) -> bool {
        match file_name.rsplit_once('.') {
            Some((_, ext)) => {
                let ext = ext.to_ascii_lowercase();
                self.blocked_extensions.contains(&ext)
            }
            None => false,
        }
    }
}

/// `retention = { ... }`: what happens to old messages on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Age in days after which a message (already archived locally) is
    /// handled.
    pub after_days: u32,
    /// What is done to it.
    pub action: RetentionAction,
}

impl Retention {
    /// [`Retention::after_days`] as a duration.
    pub fn after(&self) -> SignedDuration {
        SignedDuration::from_hours(i64::from(self.after_days) * 24)
    }
}

/// What retention does to an old message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetentionAction {
    /// Move it to this folder (created if missing).
    Move {
        /// Destination folder.
        folder: String,
    },
    /// Delete it from the server.
    Expunge,
}

impl Config {
    /// The mailbox with this name.
    pub fn mailbox(&self, name: &str) -> Option<&MailboxConfig> {
        self.mailboxes.get(name)
    }

    /// Loads the file named by `explicit`, else by `$PECGATE_CONFIG`, else
    /// [`DEFAULT_PATH`], merged with `PECGATE__...` overrides from the
    /// process environment. Returns the configuration and the absolute path
    /// of the file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the file is missing, unreadable, not TOML, or says
    /// something invalid; the message names the file and the key.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, PathBuf), ConfigError> {
        let env: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        let path = choose_file(explicit, env.get(CONFIG_ENV).map(String::as_str));
        let path = absolute(&path);
        let config = load_from(&path, env)?;
        Ok((config, path))
    }

    /// Loads `path` with `env` standing in for the process environment, both
    /// for `PECGATE__...` overrides and for `password_env` look-ups (tests
    /// never modify the real environment).
    ///
    /// # Errors
    ///
    /// As [`Config::load`].
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        load_from(&absolute(path), env.into_iter().collect())
    }
}

/// Which file to read: `--config`, else `$PECGATE_CONFIG` (if not empty),
/// else the default.
fn choose_file(explicit: Option<&Path>, from_env: Option<&str>) -> PathBuf {
    match (explicit, from_env) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(e)) if !e.is_empty() => PathBuf::from(e),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

fn absolute(p: &Path) -> PathBuf {
    normalize(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

fn load_from(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::NotFound {
                path: path.to_path_buf(),
            });
        }
        Err(e) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let overrides = EnvOverrides::new(&env, &text);
    let env_source = ::config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .source(Some(env.clone().into_iter().collect()));
    let merged = ::config::Config::builder()
        .add_source(::config::File::from_str(&text, ::config::FileFormat::Toml))
        .add_source(env_source)
        .build()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let raw: RawConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
        let problem = deserialize_problem(&e.path().to_string(), e.inner());
        ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: vec![overrides.annotate(problem)],
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let lookup = |name: &str| env.get(name).cloned();
    raw.validate(base, &lookup)
        .map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: problems
                .into_iter()
                .map(|p| overrides.annotate(p))
                .collect(),
        })
}

/// The `PECGATE__...` variables, so that a problem with a key that came from
/// the environment says which variable set it.
struct EnvOverrides {
    /// (dotted key, variable name), sorted.
    vars: Vec<(String, String)>,
    /// The file alone, to tell whether a table exists only because an
    /// environment variable created it (a typo in a mailbox name).
    file: Option<::config::Config>,
}

impl EnvOverrides {
    fn new(env: &HashMap<String, String>, text: &str) -> Self {
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
        let mut v: Vec<(String, String)> = env
            .keys()
            .filter_map(|var| {
                let lower = var.to_lowercase();
                let rest = lower.strip_prefix(&prefix)?;
                Some((rest.replace(ENV_SEPARATOR, "."), var.clone()))
            })
            .collect();
        v.sort();
        let file = if v.is_empty() {
            None
        } else {
            ::config::Config::builder()
                .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
                .build()
                .ok()
        };
        Self { vars: v, file }
    }

    fn in_file(&self, key: &str) -> bool {
        self.file
            .as_ref()
            .is_none_or(|f| f.get::<::config::Value>(key).is_ok())
    }

    fn annotate(&self, mut p: Problem) -> Problem {
        let hit = self.vars.iter().find(|(key, _)| {
            *key == p.key
                || p.key.starts_with(&format!("{key}."))
                || key.starts_with(&format!("{}.", p.key))
        });
        if let Some((_, var)) = hit {
            p.message = format!("{} (set by environment variable {var})", p.message);
            return p;
        }
        // A table that only an environment variable created.
        for (key, var) in &self.vars {
            let common: Vec<&str> = key
                .split('.')
                .zip(p.key.split('.'))
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect();
            let missing = (1..=common.len())
                .map(|n| common[..n].join("."))
                .find(|table| !self.in_file(table));
            if let Some(table) = missing {
                p.message = format!(
                    "{} ({table} is not in the file: it comes from environment variable {var})",
                    p.message
                );
                break;
            }
        }
        p
    }
}

/// Turns a deserialization error at `path` into a problem with a readable
/// message (the `config` crate decorates its messages with keys and origins
/// that `path` already gives).
fn deserialize_problem(path: &str, err: &::config::ConfigError) -> Problem {
    let path = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    match innermost(err) {
        ::config::ConfigError::NotFound(key) => {
            // Only Option fields exist, so this is unexpected; name the key.
            let field = key.rsplit('.').next().unwrap_or(key);
            Problem {
                key: join_key(&path, field),
                message: "missing (required)".to_string(),
            }
        }
        ::config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => Problem {
            key: path,
            message: format!("wrong type: found {unexpected}, expected {expected}"),
        },
        other => {
            let message = other.to_string();
            let last = path.rsplit('.').next().unwrap_or("").to_string();
            Problem {
                message: describe_serde_message(&message, &last),
                key: if path.is_empty() {
                    "(top level)".to_string()
                } else {
                    path
                },
            }
        }
    }
}

fn innermost(err: &::config::ConfigError) -> &::config::ConfigError {
    match err {
        ::config::ConfigError::At { error, .. } => innermost(error),
        other => other,
    }
}

fn join_key(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" as
/// "unknown key (expected one of: a, b)"; other messages pass through.
fn describe_serde_message(msg: &str, key: &str) -> String {
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        // "invalid type: integer `5`, expected struct RawStore"
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, "?"));
        let expected = if expected.starts_with("struct Raw") || expected.starts_with("a map") {
            "a table"
        } else {
            expected
        };
        return format!("wrong type: found {found}, expected {expected}");
    }
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return msg.to_string();
    };
    let after = rest.split_once("`, ").map(|(_, a)| a).unwrap_or("");
    let clean = |s: &str| s.trim().trim_matches('`').to_string();
    let expected: Vec<String> = if let Some(list) = after.strip_prefix("expected one of ") {
        list.split(", ").map(clean).collect()
    } else if let Some(list) = after.strip_prefix("expected ") {
        list.split(" or ").map(clean).collect()
    } else {
        Vec::new()
    };
    let mut out = if expected.is_empty() {
        "unknown key".to_string()
    } else {
        format!("unknown key (expected one of: {})", expected.join(", "))
    };
    if key == "password" {
        out.push_str(
            "; passwords never sit in the configuration file: use password_file or password_env",
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Collects problems while stage 2 walks the raw configuration.
struct Check<'a> {
    base: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
}

impl Check<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn required<'v, T>(&mut self, key: &str, v: &'v Option<T>) -> Option<&'v T> {
        if v.is_none() {
            self.problem(key, "missing (required)");
        }
        v.as_ref()
    }

    /// A path, resolved against the configuration file's directory.
    fn path(&mut self, key: &str, v: &str) -> Option<PathBuf> {
        if v.trim().is_empty() {
            self.problem(key, "empty path");
            return None;
        }
        Some(resolve(self.base, v))
    }

    fn required_path(&mut self, key: &str, v: &Option<String>) -> PathBuf {
        match self.required(key, v) {
            Some(s) => self.path(key, &s.clone()).unwrap_or_default(),
            None => PathBuf::new(),
        }
    }

    /// A positive duration given as a number of `unit`s (`unit_secs`
    /// seconds each); fractions are allowed (tests use short ones).
    fn duration(&mut self, key: &str, v: Option<f64>, default: f64, unit_secs: f64) -> Duration {
        let x = v.unwrap_or(default);
        let unit = key.rsplit('_').next().unwrap_or("units");
        if !x.is_finite() || x <= 0.0 {
            self.problem(key, format!("{x} is not a positive number of {unit}"));
            return Duration::from_secs_f64(default * unit_secs);
        }
        match Duration::try_from_secs_f64(x * unit_secs) {
            Ok(d) if SignedDuration::try_from(d).is_ok() => d,
            _ => {
                self.problem(key, format!("{x} {unit} is too long"));
                Duration::from_secs_f64(default * unit_secs)
            }
        }
    }

    fn signed(
        &mut self,
        key: &str,
        v: Option<f64>,
        default: f64,
        unit_secs: f64,
    ) -> SignedDuration {
        let d = self.duration(key, v, default, unit_secs);
        SignedDuration::try_from(d).unwrap_or(SignedDuration::ZERO)
    }

    /// A whole number in `min..=max` (default when absent).
    fn int<T: TryFrom<i64> + Default>(
        &mut self,
        key: &str,
        v: Option<i64>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        let Some(x) = v else { return default };
        if x < min || x > max {
            let message = if max < i64::from(u32::MAX) {
                format!("{x} is out of range ({min}-{max})")
            } else if x < min {
                format!("{x} is too small (at least {min})")
            } else {
                format!("{x} is too large (at most {max})")
            };
            self.problem(key, message);
            return default;
        }
        T::try_from(x).unwrap_or_default()
    }
}

fn resolve(base: &Path, v: &str) -> PathBuf {
    let p = Path::new(v);
    if p.is_absolute() {
        normalize(p)
    } else {
        normalize(&base.join(p))
    }
}

/// Removes `.` and resolves `..` lexically (no file system access: the
/// folders need not exist yet).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

impl RawConfig {
    /// Stage 2: checks everything, applies defaults, resolves paths against
    /// `base` and loads passwords (`env` answers `password_env` look-ups).
    /// Returns every problem found, in key order.
    fn validate(
        self,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<Problem>> {
        let mut c = Check {
            base,
            env,
            problems: Vec::new(),
        };

        let gateway = {
            let hostname = match self.gateway.as_ref().and_then(|g| g.hostname.as_ref()) {
                Some(h) => match check_hostname(h) {
                    Ok(h) => h,
                    Err(m) => {
                        c.problem("gateway.hostname", m);
                        String::new()
                    }
                },
                None => machine_hostname(),
            };
            let stop_timeout = c.duration(
                "gateway.stop_timeout_seconds",
                self.gateway.as_ref().and_then(|g| g.stop_timeout_seconds),
                30.0,
                1.0,
            );
            GatewayConfig {
                hostname,
                stop_timeout,
            }
        };

        let store = {
            let raw = self.store.clone().unwrap_or_default();
            if self.store.is_none() {
                c.problem(
                    "store",
                    "missing table [store] (database = \"...\", archive = \"...\")",
                );
                StoreConfig {
                    database: PathBuf::new(),
                    archive: PathBuf::new(),
                }
            } else {
                StoreConfig {
                    database: c.required_path("store.database", &raw.database),
                    archive: c.required_path("store.archive", &raw.archive),
                }
            }
        };

        let trust = {
            let list = self
                .trust
                .as_ref()
                .and_then(|t| t.anchors.clone())
                .unwrap_or_default()
                .0;
            let mut anchors = Vec::new();
            for (i, a) in list.iter().enumerate() {
                let key = format!("trust.anchors[{i}]");
                if let Some(p) = c.path(&key, a) {
                    if p.is_dir() {
                        anchors.push(p);
                    } else {
                        c.problem(
                            key,
                            format!(
                                "{} is not a directory (give directories of PEM/DER certificates, or leave anchors out to use the built-in ones)",
                                p.display()
                            ),
                        );
                    }
                }
            }
            TrustConfig { anchors }
        };

        let outbox = {
            let raw = self.outbox.clone().unwrap_or_default();
            OutboxConfig {
                settle: c.duration("outbox.settle_seconds", raw.settle_seconds, 5.0, 1.0),
                rescan: c.duration("outbox.rescan_seconds", raw.rescan_seconds, 30.0, 1.0),
            }
        };

        let deadlines = {
            let raw = self.deadlines.clone().unwrap_or_default();
            Deadlines {
                acceptance: c.signed(
                    "deadlines.acceptance_minutes",
                    raw.acceptance_minutes,
                    30.0,
                    60.0,
                ),
                delivery: c.signed("deadlines.delivery_hours", raw.delivery_hours, 26.0, 3600.0),
                uncertain_grace: c.signed(
                    "deadlines.uncertain_grace_minutes",
                    raw.uncertain_grace_minutes,
                    15.0,
                    60.0,
                ),
            }
        };

        let logging = {
            let raw = self.logging.clone().unwrap_or_default();
            let mut out = LoggingConfig::default();
            if let Some(level) = raw.level {
                match check_filter(&level) {
                    Ok(()) => out.level = level,
                    Err(m) => c.problem("logging.level", m),
                }
            }
            if let Some(f) = raw.format {
                match f.parse() {
                    Ok(f) => out.format = f,
                    Err(m) => c.problem("logging.format", m),
                }
            }
            out
        };

        let report = {
            let mut out = ReportConfig::default();
            if let Some(price) = self.report.as_ref().and_then(|r| r.unit_price_eur) {
                let cents = (price * 100.0).round();
                if !price.is_finite() || price < 0.0 || cents > 1e12 {
                    c.problem(
                        "report.unit_price_eur",
                        format!("{price} is not a price in euro (a number >= 0, e.g. 5.40)"),
                    );
                } else if (price * 100.0 - cents).abs() > 1e-6 {
                    c.problem(
                        "report.unit_price_eur",
                        format!(
                            "{price} has fractions of a cent (use at most two decimals, e.g. 5.40)"
                        ),
                    );
                } else {
                    // In range: checked above.
                    out.unit_price_cents = cents as u64;
                }
            }
            out
        };

        let backup = self.backup.as_ref().map(|raw| BackupConfig {
            dir: c.required_path("backup.dir", &raw.dir),
            every: c.duration("backup.every_hours", raw.every_hours, 24.0, 3600.0),
            keep: c.int("backup.keep", raw.keep, 14, 1, i64::from(u32::MAX)),
        });

        let mut mailboxes = BTreeMap::new();
        match &self.mailbox {
            None => c.problem(
                "mailbox",
                "no mailbox configured (add at least one [mailbox.NAME] table)",
            ),
            Some(m) if m.is_empty() => c.problem(
                "mailbox",
                "no mailbox configured (add at least one [mailbox.NAME] table)",
            ),
            Some(m) => {
                for (name, raw) in m {
                    if let Some(mb) = c.mailbox(name, raw) {
                        mailboxes.insert(name.clone(), mb);
                    }
                }
            }
        }

        // Across mailboxes: one address per mailbox, one use per folder.
        let mut by_address: BTreeMap<&str, &str> = BTreeMap::new();
        let mut folders: Vec<(String, &Path)> =
            vec![("store.archive".to_string(), store.archive.as_path())];
        if let Some(b) = &backup {
            folders.push(("backup.dir".to_string(), b.dir.as_path()));
        }
        for (name, mb) in &mailboxes {
            if let Some(other) = by_address.insert(&mb.address, name) {
                c.problem(
                    format!("mailbox.{name}.address"),
                    format!(
                        "{} is also the address of mailbox.{other} (each mailbox needs its own address)",
                        mb.address
                    ),
                );
            }
            for (what, p) in [
                ("outbox", &mb.outbox),
                ("sent", &mb.sent),
                ("inbox", &mb.inbox),
            ] {
                folders.push((format!("mailbox.{name}.{what}"), p.as_path()));
            }
        }
        for (i, (key, p)) in folders.iter().enumerate() {
            if p.as_os_str().is_empty() {
                continue;
            }
            if let Some((other, _)) = folders[..i].iter().find(|(_, q)| q == p) {
                c.problem(
                    key.clone(),
                    format!(
                        "{} is also {other} (each folder must be distinct)",
                        p.display()
                    ),
                );
            }
        }

        if c.problems.is_empty() {
            Ok(Config {
                gateway,
                store,
                trust,
                outbox,
                deadlines,
                logging,
                report,
                backup,
                mailboxes,
            })
        } else {
            Err(c.problems)
        }
    }
}

/// Which protocol a server block is for (default ports differ).
#[derive(Clone, Copy)]
enum Protocol {
    Smtp,
    Imap,
}

impl Check<'_> {
    fn mailbox(&mut self, name: &str, raw: &RawMailbox) -> Option<MailboxConfig> {
        let k = format!("mailbox.{name}");
        let before = self.problems.len();
        if !is_mailbox_name(name) {
            self.problem(
                k.clone(),
                format!("{name:?} is not a valid mailbox name (use lowercase letters, digits, '_' and '-')"),
            );
        }
        let address = match self.required(&format!("{k}.address"), &raw.address) {
            Some(a) => match check_address(a) {
                Ok(a) => a,
                Err(m) => {
                    self.problem(format!("{k}.address"), m);
                    String::new()
                }
            },
            None => String::new(),
        };
        let outbox = self.required_path(&format!("{k}.outbox"), &raw.outbox);
        let sent = self.required_path(&format!("{k}.sent"), &raw.sent);
        let inbox = self.required_path(&format!("{k}.inbox"), &raw.inbox);

        let smtp = match self.required(&format!("{k}.smtp"), &raw.smtp) {
            Some(s) => self.server(&format!("{k}.smtp"), &s.clone(), &address, Protocol::Smtp),
            None => None,
        };
        let imap = match self.required(&format!("{k}.imap"), &raw.imap) {
            Some(i) => {
                let i = i.clone();
                let ik = format!("{k}.imap");
                let server = self.server(&ik, &i.server(), &address, Protocol::Imap);
                let folder = i.folder.clone().unwrap_or_else(|| "INBOX".to_string());
                if folder.trim().is_empty() {
                    self.problem(format!("{ik}.folder"), "empty folder name");
                }
                let poll = self.duration(&format!("{ik}.poll_seconds"), i.poll_seconds, 60.0, 1.0);
                let quota = self.int(
                    &format!("{ik}.quota_warn_percent"),
                    i.quota_warn_percent,
                    80u8,
                    1,
                    100,
                );
                server.map(|server| ImapConfig {
                    server,
                    folder,
                    idle: i.idle.unwrap_or(true),
                    poll,
                    read_only: i.read_only.unwrap_or(true),
                    quota_warn_percent: quota,
                })
            }
            None => None,
        };

        let pace = {
            let raw = raw.pace.clone().unwrap_or_default();
            let d = Pace::default();
            Pace {
                per_minute: self.int(
                    &format!("{k}.pace.per_minute"),
                    raw.per_minute,
                    d.per_minute,
                    1,
                    i64::from(u32::MAX),
                ),
                per_day: self.int(
                    &format!("{k}.pace.per_day"),
                    raw.per_day,
                    d.per_day,
                    1,
                    i64::from(u32::MAX),
                ),
            }
        };

        let limits = {
            let raw = raw.limits.clone().unwrap_or_default();
            let d = Limits::default();
            let mut blocked = Vec::new();
            match raw.blocked_extensions {
                None => blocked = d.blocked_extensions,
                Some(list) => {
                    for (i, e) in list.iter().enumerate() {
                        let e = e.trim().trim_start_matches('.').to_ascii_lowercase();
                        if e.is_empty() || e.contains(['.', '/', '\\', ' ']) {
                            self.problem(
                                format!("{k}.limits.blocked_extensions[{i}]"),
                                format!(
                                    "{:?} is not a file extension (write e.g. \"exe\")",
                                    list[i]
                                ),
                            );
                        } else {
                            blocked.push(e);
                        }
                    }
                }
            }
            Limits {
                max_recipients: self.int(
                    &format!("{k}.limits.max_recipients"),
                    raw.max_recipients,
                    d.max_recipients,
                    1,
                    i64::from(u32::MAX),
                ),
                max_total_bytes: self.int(
                    &format!("{k}.limits.max_total_bytes"),
                    raw.max_total_bytes,
                    d.max_total_bytes,
                    1,
                    i64::MAX,
                ),
                blocked_extensions: blocked,
            }
        };

        let retention = raw.retention.as_ref().and_then(|r| {
            let rk = format!("{k}.retention");
            let after_days = match self.required(&format!("{rk}.after_days"), &r.after_days) {
                Some(&d) => self.int(&format!("{rk}.after_days"), Some(d), 0u32, 1, i64::from(u32::MAX)),
                None => 0,
            };
            let action = match self.required(&format!("{rk}.action"), &r.action).map(String::as_str) {
                Some("move") => match r.folder.as_deref() {
                    Some(f) if !f.trim().is_empty() => Some(RetentionAction::Move { folder: f.to_string() }),
                    _ => {
                        self.problem(format!("{rk}.folder"), "missing: action = \"move\" needs the destination folder (e.g. folder = \"Archivio\")");
                        None
                    }
                },
                Some("expunge") => {
                    if r.folder.is_some() {
                        self.problem(format!("{rk}.folder"), "only used with action = \"move\" (remove it, or use action = \"move\")");
                    }
                    Some(RetentionAction::Expunge)
                }
                Some(other) => {
                    self.problem(format!("{rk}.action"), format!("{other:?} is not a retention action (expected one of: move, expunge)"));
                    None
                }
                None => None,
            };
            if imap.as_ref().is_some_and(|i| i.read_only) {
                self.problem(
                    rk.clone(),
                    "retention moves or deletes messages on the server, so it needs imap.read_only = false",
                );
            }
            action.map(|action| Retention { after_days, action })
        });

        if self.problems.len() > before {
            return None;
        }
        Some(MailboxConfig {
            name: name.to_string(),
            address,
            outbox,
            sent,
            inbox,
            smtp: smtp?,
            imap: imap?,
            pace,
            limits,
            retention,
        })
    }

    fn server(
        &mut self,
        k: &str,
        raw: &RawSmtp,
        address: &str,
        proto: Protocol,
    ) -> Option<ServerConfig> {
        let before = self.problems.len();
        let host = match self.required(&format!("{k}.host"), &raw.host) {
            Some(h) => match check_host(h) {
                Ok(h) => h,
                Err(m) => {
                    self.problem(format!("{k}.host"), m);
                    String::new()
                }
            },
            None => String::new(),
        };
        let tls = match raw.tls.as_deref() {
            None => TlsMode::Implicit,
            Some(t) => match t.parse() {
                Ok(t) => t,
                Err(m) => {
                    self.problem(format!("{k}.tls"), m);
                    TlsMode::Implicit
                }
            },
        };
        let port = match raw.port {
            None => default_port(proto, tls),
            Some(p) => match u16::try_from(p) {
                Ok(p) if p != 0 => p,
                _ => {
                    self.problem(
                        format!("{k}.port"),
                        format!("{p} is not a valid port (1-65535)"),
                    );
                    0
                }
            },
        };
        let username = match &raw.username {
            Some(u) if u.trim().is_empty() => {
                self.problem(
                    format!("{k}.username"),
                    "empty (leave it out to log in with the mailbox address)",
                );
                String::new()
            }
            Some(u) => u.clone(),
            None => address.to_string(),
        };
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(_)) => {
                self.problem(
                    k.to_string(),
                    "both password_file and password_env are set (keep exactly one)",
                );
                None
            }
            (None, None) => {
                self.problem(
                    k.to_string(),
                    "no password: set password_file (a file holding the password, e.g. a systemd credential) or password_env (the name of an environment variable)",
                );
                None
            }
            (Some(f), None) => self.password_file(&format!("{k}.password_file"), f),
            (None, Some(var)) => self.password_env(&format!("{k}.password_env"), var),
        };
        let ca_file = raw
            .ca_file
            .as_ref()
            .and_then(|f| self.ca_file(&format!("{k}.ca_file"), f));
        let timeout = self.duration(
            &format!("{k}.timeout_seconds"),
            raw.timeout_seconds,
            60.0,
            1.0,
        );
        if self.problems.len() > before {
            return None;
        }
        Some(ServerConfig {
            host,
            port,
            tls,
            ca_file,
            username,
            password: password?,
            timeout,
        })
    }

    fn password_file(&mut self, key: &str, v: &str) -> Option<Secret> {
        let path = self.path(key, v)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                self.problem(
                    key,
                    format!("cannot read {}: {}", path.display(), io_message(&e)),
                );
                return None;
            }
        };
        let Ok(text) = String::from_utf8(bytes) else {
            self.problem(key, format!("{} is not UTF-8 text", path.display()));
            return None;
        };
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            self.problem(
                key,
                format!("{} is empty (put the password in it)", path.display()),
            );
            return None;
        }
        Some(Secret::new(value))
    }

    fn password_env(&mut self, key: &str, var: &str) -> Option<Secret> {
        if var.is_empty() {
            self.problem(key, "empty (give the name of an environment variable)");
            return None;
        }
        match (self.env)(var) {
            Some(v) if !v.is_empty() => Some(Secret::new(v)),
            Some(_) => {
                self.problem(
                    key,
                    format!("environment variable {var} is empty (set it to the password)"),
                );
                None
            }
            None => {
                self.problem(
                    key,
                    format!("environment variable {var} is not set (set it to the password)"),
                );
                None
            }
        }
    }

    fn ca_file(&mut self, key: &str, v: &str) -> Option<PathBuf> {
        let path = self.path(key, v)?;
        match std::fs::read(&path) {
            Err(e) => {
                self.problem(
                    key,
                    format!("cannot read {}: {}", path.display(), io_message(&e)),
                );
                None
            }
            Ok(b) if !contains(&b, b"-----BEGIN CERTIFICATE-----") => {
                self.problem(
                    key,
                    format!(
                        "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                        path.display()
                    ),
                );
                None
            }
            Ok(_) => Some(path),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn default_port(proto: Protocol, tls: TlsMode) -> u16 {
    match (proto, tls) {
        (Protocol::Smtp, TlsMode::Implicit) => 465,
        (Protocol::Smtp, TlsMode::StartTls) => 587,
        (Protocol::Smtp, TlsMode::InsecurePlaintext) => 25,
        (Protocol::Imap, TlsMode::Implicit) => 993,
        (Protocol::Imap, _) => 143,
    }
}

fn is_mailbox_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A DNS name (letters, digits, '-', dots between labels), lowercased.
fn check_hostname(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= 253
        && lower.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(lower)
    } else {
        Err(format!(
            "{s:?} is not a host name (letters, digits and '-', dot-separated)"
        ))
    }
}

/// A server: a host name or an IP address literal.
fn check_host(s: &str) -> Result<String, String> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(s.to_string());
    }
    check_hostname(s)
}

/// `local@domain`, no spaces, a dot in the domain; lowercased.
fn check_address(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "{s:?} is not an e-mail address (expected local@domain, e.g. protocollo@pec.comune.example.it)"
        )
    };
    let Some((local, domain)) = s.rsplit_once('@') else {
        return Err(bad());
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .chars()
            .all(|c| c.is_ascii_graphic() && !"@<>()[],;:\"\\".contains(c));
    if !local_ok || !domain.contains('.') || check_hostname(domain).is_err() {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

/// Checks a tracing filter directive; a bare word that is not a level is
/// refused, because `EnvFilter` would silently take `degub` for a target.
fn check_filter(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if s.trim().is_empty() {
        return Err(
            "empty (write a level such as \"info\", or e.g. \"pecgate=debug,info\")".to_string(),
        );
    }
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains(['=', '[', ':']);
        if bare && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{d:?} is not a level (expected one of: trace, debug, info, warn, error, off; for a module write e.g. {d}=debug)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| ())
        .map_err(|e| format!("{s:?} is not a valid filter: {e}"))
}

/// This machine's host name, for Message-IDs when `[gateway] hostname` is
/// absent; `localhost` if it cannot be read or is not a DNS name.
fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|s| check_hostname(s.trim()).ok())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_file_order() {
        let p = Path::new("/x.toml");
        assert_eq!(choose_file(Some(p), Some("/y.toml")), p);
        assert_eq!(choose_file(None, Some("/y.toml")), Path::new("/y.toml"));
        assert_eq!(choose_file(None, Some("")), Path::new(DEFAULT_PATH));
        assert_eq!(choose_file(None, None), Path::new(DEFAULT_PATH));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            check_address("Protocollo@PEC.Comune.Example.IT").unwrap(),
            "protocollo@pec.comune.example.it"
        );
        for bad in [
            "", "a", "a@b", "@b.it", "a b@c.it", "a@b .it", "a@-b.it", "a@b..it", "<a@b.it>",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!(
            check_hostname("PecGate.example.it").unwrap(),
            "pecgate.example.it"
        );
        assert_eq!(check_hostname("localhost").unwrap(), "localhost");
        assert!(check_hostname("a_b.it").is_err());
        assert!(check_hostname("a b").is_err());
        assert!(check_host("127.0.0.1").is_ok());
        assert!(check_host("::1").is_ok());
    }

    #[test]
    fn filters() {
        assert!(check_filter("info").is_ok());
        assert!(check_filter("pecgate=debug,info").is_ok());
        assert!(check_filter("WARN").is_ok());
        assert!(check_filter("degub").unwrap_err().contains("not a level"));
        assert!(check_filter("").is_err());
        assert!(check_filter("pecgate=notalevel").is_err());
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(
            resolve(Path::new("/etc/pecgate"), "../x/./y"),
            Path::new("/etc/x/y")
        );
        assert_eq!(
            resolve(Path::new("/etc/pecgate"), "/abs"),
            Path::new("/abs")
        );
        assert_eq!(resolve(Path::new("/"), "../../a"), Path::new("/a"));
    }

    #[test]
    fn unknown_field_message() {
        assert_eq!(
            describe_serde_message(
                "unknown field `prot`, expected one of `host`, `port`, `tls`",
                "prot"
            ),
            "unknown key (expected one of: host, port, tls)"
        );
        assert_eq!(
            describe_serde_message("unknown field `x`, expected `store` or `mailbox`", "x"),
            "unknown key (expected one of: store, mailbox)"
        );
        assert!(
            describe_serde_message("unknown field `password`, expected `host`", "password")
                .contains("password_file")
        );
        assert_eq!(describe_serde_message("other", "k"), "other");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert!("JSON".parse::<LogFormat>().is_err());
        assert_eq!(
            "insecure-plaintext".parse::<TlsMode>().unwrap(),
            TlsMode::InsecurePlaintext
        );
        assert_eq!(TlsMode::StartTls.to_string(), "starttls");
    }

    #[test]
    fn secret_is_hidden() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn blocked_extensions() {
        let l = Limits::default();
        assert!(l.is_blocked("a.pdf.EXE"));
        assert!(!l.is_blocked("a.pdf"));
        assert!(!l.is_blocked("exe"));
    }

    #[test]
    fn io_message_drops_os_error() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&e), "No such file or directory");
    }
}
