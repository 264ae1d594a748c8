//! `pecgate check-config [--connect]`: can the daemon start with this
//! configuration, and (with `--connect`) can it reach and log into every
//! provider's server? Written for the operator: one line per thing checked,
//! in plain words, on stdout.
//!
//! Without `--connect` nothing leaves the machine: the configuration is
//! loaded and validated by the same code as `pecgate run`
//! ([`Config::load`], which also reads every password), every folder must
//! exist or be creatable and be writable by the user running the check (a
//! probe file named `.pecgate-check-PID` is created and removed: under
//! systemd, `ExecStartPre=` runs with the service's user and sandbox, so
//! this is exactly what the daemon will be allowed to do), and the trust
//! anchors and CA files must load.
//!
//! With `--connect`, for every mailbox's SMTP and IMAP server: the TCP
//! connection and the TLS handshake (OpenSSL, the same roots as the daemon:
//! the system's plus `ca_file`, TLS 1.2 at least, the host name checked), so
//! that an untrusted certificate is named as such; then the login through
//! the daemon's own code ([`crate::smtp::Submitter::try_login`],
//! [`crate::imap::connect`]) and, for IMAP, a read-only look at the folder.
//! Every network step is bounded by `--timeout` (and by the server's
//! `timeout_seconds`, whichever is shorter).
//!
//! Exit status (sysexits): 0 everything fine; 78 (EX_CONFIG) the
//! configuration cannot be used (the load errors are returned to `main`,
//! which maps them to 78 as well); 69 (EX_UNAVAILABLE) a server is
//! unreachable, not trusted, or refused the login. 78 wins over 69.
//!
//! Never printed: passwords (only "password loaded").

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use openssl::ssl::{HandshakeError, SslConnector, SslMethod, SslVersion};
use openssl::x509::{X509, X509VerifyResult};

use crate::config::{Config, ImapConfig, MailboxConfig, ServerConfig, TlsMode};
use crate::verify::TrustAnchors;

/// Exit status when the configuration cannot be used (sysexits EX_CONFIG).
pub const EX_CONFIG: u8 = 78;
/// Exit status when a server is unreachable or refuses the login (sysexits
/// EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;

/// What `check-config` does beyond loading the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Also connect to every server and log in.
    pub connect: bool,
    /// Limit on each network step.
    pub timeout: Duration,
}

/// How one checked item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Fine.
    Ok,
    /// Worth knowing, not a failure.
    Note,
    /// The configuration cannot be used as it is (exit 78).
    Config,
    /// A server cannot be used (exit 69).
    Unavailable,
}

/// The report, printed as it is built (a slow server shows where it hangs).
struct Report<W: Write> {
    out: W,
    config_problems: usize,
    unavailable: usize,
}

impl<W: Write> Report<W> {
    fn line(&mut self, mark: Mark, text: &str) -> io::Result<()> {
        let tag = match mark {
            Mark::Ok => "ok",
            Mark::Note => "note",
            Mark::Config => {
                self.config_problems += 1;
                "FAILED"
            }
            Mark::Unavailable => {
                self.unavailable += 1;
                "FAILED"
            }
        };
        writeln!(self.out, "  {tag:<7}{text}")?;
        self.out.flush()
    }

    fn heading(&mut self, text: &str) -> io::Result<()> {
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }
}

/// Runs `pecgate check-config`.
///
/// # Errors
/// A configuration that does not load ([`crate::config::ConfigError`],
/// exit 78 in `main`), or a failure to write the report.
pub fn run(config: Option<&Path>, options: Options) -> anyhow::Result<ExitCode> {
    let (config, path) = Config::load(config)?;
    let stdout = io::stdout();
    let mut report = Report {
        out: stdout.lock(),
        config_problems: 0,
        unavailable: 0,
    };
    let n = config.mailboxes.len();
    report.heading(&format!(
        "configuration {}: valid ({n} mailbox{})",
        path.display(),
        if n == 1 { "" } else { "es" }
    ))?;
    report.line(Mark::Note, &format!("checked as {}", running_user()))?;
    check_local(&config, &mut report)?;
    if options.connect {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for mailbox in config.mailboxes.values() {
            report.heading(&format!("mailbox {} (connecting):", mailbox.name))?;
            runtime.block_on(check_servers(
                mailbox,
                &config.gateway.hostname,
                options.timeout,
                &mut report,
            ))?;
        }
    }
    let code = if report.config_problems > 0 {
        report.heading(&format!(
            "result: {} problem(s) with the configuration: fix them before starting pecgate (exit {EX_CONFIG})",
            report.config_problems + report.unavailable
        ))?;
        ExitCode::from(EX_CONFIG)
    } else if report.unavailable > 0 {
        report.heading(&format!(
            "result: {} server problem(s): a server is unreachable, not trusted or refused the login (exit {EX_UNAVAILABLE})",
            report.unavailable
        ))?;
        ExitCode::from(EX_UNAVAILABLE)
    } else if options.connect {
        report.heading("result: ok, every server answered and accepted the login")?;
        ExitCode::SUCCESS
    } else {
        report.heading("result: ok (servers not contacted; add --connect to try them)")?;
        ExitCode::SUCCESS
    };
    Ok(code)
}

// ---------------------------------------------------------------------------
// Without network

fn check_local<W: Write>(config: &Config, report: &mut Report<W>) -> io::Result<()> {
    report.heading("store:")?;
    let db = &config.store.database;
    match check_database(db) {
        Ok(text) => report.line(Mark::Ok, &format!("database {}: {text}", db.display()))?,
        Err(text) => report.line(Mark::Config, &format!("database {}: {text}", db.display()))?,
    }
    folder_line(report, "archive", &config.store.archive)?;
    if let Some(b) = &config.backup {
        folder_line(report, "backup folder", &b.dir)?;
    }
    let anchors = if config.trust.anchors.is_empty() {
        TrustAnchors::builtin().map(|a| ("built-in PEC trust anchors".to_owned(), a))
    } else {
        let dirs: Vec<String> = config
            .trust
            .anchors
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        TrustAnchors::from_dirs(&config.trust.anchors)
            .map(|a| (format!("trust anchors in {}", dirs.join(", ")), a))
    };
    match anchors {
        Ok((what, a)) => {
            let n = a.certificates().len();
            let mark = if n == 0 { Mark::Config } else { Mark::Ok };
            report.line(mark, &format!("{what}: {n} certificate(s) loaded"))?;
        }
        Err(e) => report.line(Mark::Config, &format!("trust anchors: {e}"))?,
    }
    for m in config.mailboxes.values() {
        report.heading(&format!("mailbox {} <{}>:", m.name, m.address))?;
        folder_line(report, "outbox", &m.outbox)?;
        folder_line(report, "sent", &m.sent)?;
        folder_line(report, "inbox", &m.inbox)?;
        server_line(report, "smtp", &m.smtp, "")?;
        let imap = &m.imap;
        let extra = format!(
            ", folder {}, {}, {}",
            imap.folder,
            if imap.read_only {
                "read-only"
            } else {
                "read-write"
            },
            if imap.idle { "IDLE" } else { "polling" }
        );
        server_line(report, "imap", &imap.server, &extra)?;
    }
    Ok(())
}

fn folder_line<W: Write>(report: &mut Report<W>, what: &str, dir: &Path) -> io::Result<()> {
    match check_folder(dir) {
        Ok(text) => report.line(Mark::Ok, &format!("{what} {}: {text}", dir.display())),
        Err(text) => report.line(Mark::Config, &format!("{what} {}: {text}", dir.display())),
    }
}

fn server_line<W: Write>(
    report: &mut Report<W>,
    proto: &str,
    s: &ServerConfig,
    extra: &str,
) -> io::Result<()> {
    let tls = match s.tls {
        TlsMode::Implicit => "implicit TLS",
        TlsMode::StartTls => "STARTTLS",
        TlsMode::InsecurePlaintext => "NO TLS (insecure-plaintext: the password travels in clear)",
    };
    let ca = match &s.ca_file {
        None => String::new(),
        Some(ca) => match read_ca_file(ca) {
            Ok(n) => format!(", {n} extra CA certificate(s) from {}", ca.display()),
            Err(e) => {
                report.line(Mark::Config, &format!("{proto} ca_file {e}"))?;
                String::new()
            }
        },
    };
    let mark = if s.tls == TlsMode::InsecurePlaintext {
        Mark::Note
    } else {
        Mark::Ok
    };
    report.line(
        mark,
        &format!(
            "{proto} {}:{}: {tls}{ca}, login {}, password loaded (not shown), timeout {} s{extra}",
            s.host,
            s.port,
            s.username,
            s.timeout.as_secs_f64()
        ),
    )
}

/// The certificates of a `ca_file` (at least one).
fn read_ca_file(path: &Path) -> Result<usize, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let certs = X509::stack_from_pem(&pem)
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certs.len())
}

/// The database file: readable and writable if it exists, and its folder
/// writable (SQLite writes its journal files next to it).
fn check_database(db: &Path) -> Result<String, String> {
    let Some(dir) = db.parent() else {
        return Err("has no parent folder".to_owned());
    };
    let folder = folder_state(dir).map_err(|e| format!("folder {}: {e}", dir.display()))?;
    match std::fs::metadata(db) {
        Ok(m) if !m.is_file() => Err("exists but is not a file".to_owned()),
        Ok(_) => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(db)
            .map(|_| "exists, readable and writable".to_owned())
            .map_err(|e| format!("cannot be opened for writing by {}: {e}", running_user())),
        Err(e) if is_missing(&e) => Ok(match folder {
            Folder::Exists => {
                "will be created at the first start (its folder is writable)".to_owned()
            }
            Folder::Creatable(p) => format!(
                "will be created at the first start, with its folder ({} is writable)",
                p.display()
            ),
        }),
        Err(e) => Err(format!("cannot be examined: {e}")),
    }
}

/// A usable folder: there and writable, or creatable under a writable one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Folder {
    /// Exists and is writable.
    Exists,
    /// Missing; this nearest existing level is writable.
    Creatable(std::path::PathBuf),
}

/// Not there (also: a level of the path is a file).
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// A folder that exists and is writable, or can be created, in plain words.
fn check_folder(dir: &Path) -> Result<String, String> {
    folder_state(dir).map(|f| match f {
        Folder::Exists => "folder exists and is writable".to_owned(),
        Folder::Creatable(p) => format!(
            "does not exist yet; pecgate will create it ({} is writable)",
            p.display()
        ),
    })
}

/// What pecgate will be able to do with a folder. `Err` says what is wrong
/// in plain words.
fn folder_state(dir: &Path) -> Result<Folder, String> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err("exists but is not a folder".to_owned()),
        Ok(_) => probe_write(dir)
            .map(|()| Folder::Exists)
            .map_err(|e| format!("folder is not writable by {}: {e}", running_user())),
        Err(e) if is_missing(&e) => {
            // The nearest level that exists decides whether it can be made.
            let mut up = dir.parent();
            while let Some(p) = up {
                match std::fs::metadata(p) {
                    Ok(m) if m.is_dir() => {
                        return probe_write(p)
                            .map(|()| Folder::Creatable(p.to_path_buf()))
                            .map_err(|e| {
                                format!(
                                    "does not exist and cannot be created: {} is not writable by {}: {e}",
                                    p.display(),
                                    running_user()
                                )
                            });
                    }
                    Ok(_) => {
                        return Err(format!(
                            "cannot be created: {} is not a folder",
                            p.display()
                        ));
                    }
                    Err(e) if is_missing(&e) => up = p.parent(),
                    Err(e) => return Err(format!("cannot examine {}: {e}", p.display())),
                }
            }
            Err("cannot be created: no existing parent folder".to_owned())
        }
        Err(e) => Err(format!("cannot be examined by {}: {e}", running_user())),
    }
}

/// Creates and removes a hidden probe file (outbox scans ignore hidden
/// files): the only reliable test of writability (read-only mounts,
/// systemd's `ProtectSystem=`, ACLs).
fn probe_write(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".pecgate-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// "user NAME (uid N)" for the effective user, from /proc and /etc/passwd.
fn running_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    let Some(uid) = uid else {
        return "this user".to_owned();
    };
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid).then(|| name.to_owned())
        })
    });
    match name {
        Some(n) => format!("user {n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

// ---------------------------------------------------------------------------
// With network

/// Why a server cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// No TCP connection (name, refusal, no answer).
    Unreachable(String),
    /// The certificate does not verify (untrusted, expired, wrong name).
    NotTrusted(String),
    /// The TLS handshake or the STARTTLS dialogue failed otherwise.
    Tls(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(s) => write!(f, "unreachable: {s}"),
            Self::NotTrusted(s) => write!(f, "certificate not trusted: {s}"),
            Self::Tls(s) => write!(f, "TLS failed: {s}"),
        }
    }
}

/// Which protocol a STARTTLS dialogue speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Smtp,
    Imap,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Smtp => "smtp",
            Self::Imap => "imap",
        }
    }
}

/// The server with its per-step limit lowered to `limit`.
fn bounded(s: &ServerConfig, limit: Duration) -> ServerConfig {
    let mut s = s.clone();
    s.timeout = s.timeout.min(limit);
    s
}

async fn check_servers<W: Write>(
    m: &MailboxConfig,
    hello: &str,
    limit: Duration,
    report: &mut Report<W>,
) -> io::Result<()> {
    // SMTP.
    let smtp = bounded(&m.smtp, limit);
    let (mark, text) = match transport(&smtp, Proto::Smtp).await {
        Err(f) => (Mark::Unavailable, f.to_string()),
        Ok(tls) => match crate::smtp::Submitter::new(&smtp, hello) {
            Err(e) => (Mark::Config, format!("{tls}, cannot set up: {e}")),
            Ok(submitter) => {
                let overall = smtp.timeout.saturating_mul(4);
                match tokio::time::timeout(overall, submitter.try_login()).await {
                    Err(_) => (
                        Mark::Unavailable,
                        format!("{tls}, login: no answer within {} s", overall.as_secs()),
                    ),
                    Ok(Ok(())) => (Mark::Ok, format!("{tls}, login ok")),
                    Ok(Err(crate::smtp::SubmitOutcome::AuthRefused { reply })) => {
                        (Mark::Unavailable, format!("{tls}, login refused: {reply}"))
                    }
                    Ok(Err(other)) => (
                        Mark::Unavailable,
                        format!("{tls}, login failed: {}", outcome_text(&other)),
                    ),
                }
            }
        },
    };
    report.line(
        mark,
        &format!("smtp {}:{}: {text}", m.smtp.host, m.smtp.port),
    )?;

    // IMAP.
    let imap = ImapConfig {
        server: bounded(&m.imap.server, limit),
        ..m.imap.clone()
    };
    let (mark, text) = match transport(&imap.server, Proto::Imap).await {
        Err(f) => (Mark::Unavailable, f.to_string()),
        Ok(tls) => {
            let overall = imap.server.timeout.saturating_mul(4);
            match tokio::time::timeout(overall, imap_login(&imap)).await {
                Err(_) => (
                    Mark::Unavailable,
                    format!("{tls}, login: no answer within {} s", overall.as_secs()),
                ),
                Ok(Ok(folder)) => (Mark::Ok, format!("{tls}, login ok, {folder}")),
                Ok(Err(e)) if e.is_auth() => (
                    Mark::Unavailable,
                    format!("{tls}, login refused: {}", auth_reason(&e)),
                ),
                Ok(Err(e)) => (Mark::Unavailable, format!("{tls}, login failed: {e}")),
            }
        }
    };
    report.line(
        mark,
        &format!("imap {}:{}: {text}", m.imap.server.host, m.imap.server.port),
    )
}

/// The server's words of a refused IMAP login (without repeating the user).
fn auth_reason(e: &crate::imap::ImapError) -> String {
    match e {
        crate::imap::ImapError::Auth { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

fn outcome_text(o: &crate::smtp::SubmitOutcome) -> String {
    use crate::smtp::SubmitOutcome as O;
    match o {
        O::NotSent { reason } | O::Uncertain { reason } => reason.clone(),
        O::Accepted { reply } | O::Refused { reply } | O::AuthRefused { reply } => reply.clone(),
    }
}

/// Logs in with the daemon's own IMAP code and examines the folder
/// (read-only: nothing changes on the server).
async fn imap_login(cfg: &ImapConfig) -> Result<String, crate::imap::ImapError> {
    let mut session = crate::imap::connect(cfg).await?;
    let limit = session.timeout();
    let folder = match tokio::time::timeout(limit, session.raw().examine(&cfg.folder)).await {
        Ok(Ok(mb)) => format!("folder {} ({} messages)", cfg.folder, mb.exists),
        Ok(Err(e)) => format!("but folder {} cannot be opened: {e}", cfg.folder),
        Err(_) => format!(
            "but folder {}: no answer within {} s",
            cfg.folder,
            limit.as_secs()
        ),
    };
    session.logout().await;
    Ok(folder)
}

/// TCP + (STARTTLS dialogue) + TLS handshake, off the async threads.
/// Returns how the transport went, e.g. "TLS ok (TLSv1.3)".
async fn transport(s: &ServerConfig, proto: Proto) -> Result<String, Failure> {
    if s.tls == TlsMode::InsecurePlaintext {
        let (host, port, limit) = (s.host.clone(), s.port, s.timeout);
        return tokio::task::spawn_blocking(move || tcp(&host, port, limit).map(drop))
            .await
            .map_err(|e| Failure::Tls(e.to_string()))?
            .map(|()| "connected without TLS (insecure-plaintext)".to_owned());
    }
    let s = s.clone();
    tokio::task::spawn_blocking(move || tls_probe(&s, proto))
        .await
        .map_err(|e| Failure::Tls(e.to_string()))?
}

fn tcp(host: &str, port: u16, limit: Duration) -> Result<TcpStream, Failure> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Failure::Unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = Failure::Unreachable(format!("{host} has no address"));
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, limit) {
            Ok(t) => {
                let _ = t.set_read_timeout(Some(limit));
                let _ = t.set_write_timeout(Some(limit));
                return Ok(t);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                last = Failure::Unreachable(format!(
                    "no answer from {addr} within {} s",
                    limit.as_secs_f64()
                ));
            }
            Err(e) => last = Failure::Unreachable(format!("{addr}: {e}")),
        }
    }
    Err(last)
}

fn tls_probe(s: &ServerConfig, proto: Proto) -> Result<String, Failure> {
    let tls_err = |e: openssl::error::ErrorStack| Failure::Tls(e.to_string());
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(tls_err)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls_err)?;
    if let Some(ca) = &s.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| Failure::Tls(format!("ca_file {}: {e}", ca.display())))?;
        for cert in X509::stack_from_pem(&pem).map_err(tls_err)? {
            b.cert_store_mut().add_cert(cert).map_err(tls_err)?;
        }
    }
    let connector = b.build();
    let mut stream = tcp(&s.host, s.port, s.timeout)?;
    if s.tls == TlsMode::StartTls {
        starttls(&mut stream, proto, s.timeout)?;
    }
    let config = connector.configure().map_err(tls_err)?;
    match config.connect(&s.host, stream) {
        Ok(mut tls) => {
            let version = tls.ssl().version_str().to_owned();
            let until = tls
                .ssl()
                .peer_certificate()
                .map(|c| format!(", certificate valid until {}", c.not_after()))
                .unwrap_or_default();
            let _ = tls.shutdown();
            Ok(format!("TLS ok ({version}{until})"))
        }
        Err(HandshakeError::Failure(mid)) => {
            let verify = mid.ssl().verify_result();
            if verify != X509VerifyResult::OK {
                Err(Failure::NotTrusted(verify.error_string().to_owned()))
            } else {
                Err(Failure::Tls(handshake_text(mid.error())))
            }
        }
        Err(HandshakeError::SetupFailure(e)) => Err(tls_err(e)),
        Err(HandshakeError::WouldBlock(_)) => Err(Failure::Tls(format!(
            "handshake: no answer within {} s",
            s.timeout.as_secs_f64()
        ))),
    }
}

fn handshake_text(e: &openssl::ssl::Error) -> String {
    match e.io_error() {
        Some(io)
            if io.kind() == io::ErrorKind::WouldBlock || io.kind() == io::ErrorKind::TimedOut =>
        {
            "handshake: no answer in time".to_owned()
        }
        _ => e.to_string(),
    }
}

/// The plain-text part of STARTTLS, so that the handshake that follows can
/// be judged on its own.
fn starttls(stream: &mut TcpStream, proto: Proto, limit: Duration) -> Result<(), Failure> {
    let fail = |what: &str| Failure::Tls(format!("STARTTLS ({}): {what}", proto.as_str()));
    let io_fail = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Failure::Tls(format!(
                "STARTTLS ({}): no answer within {} s",
                proto.as_str(),
                limit.as_secs_f64()
            ))
        } else {
            Failure::Tls(format!("STARTTLS ({}): {e}", proto.as_str()))
        }
    };
    let mut reader = BufReader::new(stream.try_clone().map_err(io_fail)?);
    let mut line = || -> Result<String, Failure> {
        let mut l = String::new();
        let n = (&mut reader)
            .take(8192)
            .read_line(&mut l)
            .map_err(io_fail)?;
        if n == 0 {
            return Err(fail("connection closed by the server"));
        }
        Ok(l.trim_end().to_owned())
    };
    match proto {
        Proto::Smtp => {
            // Greeting (possibly multi-line), EHLO, STARTTLS.
            let mut reply = |want: &str| -> Result<Vec<String>, Failure> {
                let mut lines = Vec::new();
                loop {
                    let l = line()?;
                    let done = l.as_bytes().get(3) != Some(&b'-');
                    lines.push(l);
                    if done {
                        break;
                    }
                }
                let last = lines.last().cloned().unwrap_or_default();
                if last.starts_with(want) {
                    Ok(lines)
                } else {
                    Err(fail(&format!("unexpected reply {last:?}")))
                }
            };
            reply("220")?;
            stream
                .write_all(b"EHLO pecgate-check\r\n")
                .map_err(io_fail)?;
            let ehlo = reply("250")?;
            if !ehlo.iter().any(|l| {
                l.get(4..)
                    .is_some_and(|k| k.eq_ignore_ascii_case("STARTTLS"))
            }) {
                return Err(fail(
                    "the server does not offer STARTTLS (tls = \"starttls\" requires it)",
                ));
            }
            stream.write_all(b"STARTTLS\r\n").map_err(io_fail)?;
            reply("220")?;
        }
        Proto::Imap => {
            let greeting = line()?;
            if !greeting.starts_with("* OK") {
                return Err(fail(&format!("unexpected greeting {greeting:?}")));
            }
            stream.write_all(b"c1 STARTTLS\r\n").map_err(io_fail)?;
            loop {
                let l = line()?;
                if let Some(rest) = l.strip_prefix("c1 ") {
                    if rest.to_ascii_uppercase().starts_with("OK") {
                        break;
                    }
                    return Err(fail(&format!("refused: {l:?}")));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_judged_by_what_can_be_done() {
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().join("outbox");
        std::fs::create_dir(&existing).unwrap();
        assert_eq!(
            check_folder(&existing).unwrap(),
            "folder exists and is writable"
        );
        // The probe file is gone.
        assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);
        let missing = tmp.path().join("a/b/sent");
        let ok = check_folder(&missing).unwrap();
        assert!(ok.starts_with("does not exist yet"), "{ok}");
        assert!(!missing.exists(), "a check creates nothing");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            check_folder(&file).unwrap_err(),
            "exists but is not a folder"
        );
        let under_file = file.join("inbox");
        assert!(
            check_folder(&under_file)
                .unwrap_err()
                .contains("is not a folder"),
        );
    }

    #[test]
    fn database_needs_its_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("pecgate.db");
        assert!(check_database(&db).unwrap().starts_with("will be created"));
        std::fs::write(&db, b"").unwrap();
        assert_eq!(
            check_database(&db).unwrap(),
            "exists, readable and writable"
        );
        let dir_db = tmp.path().join("dir.db");
        std::fs::create_dir(&dir_db).unwrap();
        assert!(check_database(&dir_db).is_err());
    }

    #[test]
    fn the_running_user_is_named() {
        let u = running_user();
        assert!(u.contains("uid "), "{u}");
    }
}
