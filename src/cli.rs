//! The command line: argument parsing (clap) and the commands that need no
//! daemon. `main` calls [`run`] and turns its result into an exit status.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;
use crate::pec::inspect::{Inspection, inspect};
use crate::verify::{Status, TimeSource, TrustAnchors, Verdict, Verifier, rfc3339};

/// Largest file `inspect` and `verify` read (a PEC message is at most about
/// 100 MB; anything larger is not a PEC message).
pub const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;

/// pecgate: certified e-mail (PEC) gateway.
#[derive(Debug, Parser)]
#[command(name = "pecgate", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (default: $PECGATE_CONFIG, else /etc/pecgate/pecgate.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format: auto (JSON under systemd or when not a terminal), json, human.
    #[arg(long, global = true, env = "PECGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing directive, e.g. "info" or "pecgate=debug").
    #[arg(long, global = true, env = "PECGATE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Say what saved messages are (kind, daticert, problems) without judging signatures.
    Inspect(InspectArgs),
    /// Check the providers' S/MIME signatures of saved messages against the PEC trust anchors.
    Verify(VerifyArgs),
    /// Run a local PEC world (two simulated providers on a real Dovecot) for tests and demos.
    Sandbox(SandboxArgs),
    /// Run the gateway: every mailbox's outbox and sending tasks, until SIGTERM/SIGINT.
    Run,
    /// List letters (dispatches) and their recipients.
    List(ListArgs),
    /// Show one letter's timeline: every event and receipt with its verdict.
    Show(ShowArgs),
    /// Decide about an uncertain letter (safe while the daemon runs).
    Resolve(ResolveArgs),
    /// Check the configuration, folders, trust anchors and passwords
    /// (--connect: also TLS and login on every server). Exit 0 ok, 78
    /// configuration unusable, 69 a server unreachable or login refused.
    CheckConfig(CheckConfigArgs),
    /// Per mailbox: letters by state, stale, uncertain, quarantined, last sync, backlog
    /// (read-only, safe while the daemon runs).
    Status(StatusArgs),
    /// What PEC did in one month: letters, deliveries, paper fallback, money saved.
    Report(ReportArgs),
    /// Write a complete, consistent backup (database, archive, sent and inbox folders)
    /// into a new or empty directory (safe while the daemon runs).
    Backup(BackupArgs),
    /// Put a backup back after checking every file (the daemon must be stopped).
    Restore(RestoreArgs),
    /// See it all work: a sandbox, the gateway, sample letters followed to their receipts.
    Demo(DemoArgs),
    /// Rebuild a lost database from the sent folders (dispatch.json) and the archive
    /// (the daemon must be stopped). Exit 0 everything restored, 1 problems listed.
    Reindex(ReindexArgs),
}

/// Arguments of `pecgate check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Also connect to every SMTP and IMAP server: TLS handshake and login.
    #[arg(long)]
    pub connect: bool,
    /// Limit on each network step with --connect, in seconds (the servers'
    /// own timeout_seconds applies when shorter).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
}

/// Runs `pecgate check-config`.
///
/// # Errors
/// A configuration that does not load (exit 78), a bad `--timeout`, or a
/// failure to write the report.
pub fn run_check_config(config: Option<&Path>, args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        anyhow::bail!(
            "--timeout must be a number of seconds between 0 and 3600 (got {})",
            args.timeout
        );
    }
    crate::check::run(
        config,
        crate::check::Options {
            connect: args.connect,
            timeout: std::time::Duration::from_secs_f64(args.timeout),
        },
    )
}

/// Arguments of `pecgate show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A dispatch id, the Message-ID of any attempt, a protocol number or
    /// the provider's identificativo.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// One JSON object per letter instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pecgate resolve`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["resend", "mark_sent"])))]
pub struct ResolveArgs {
    /// The uncertain letter's dispatch id.
    #[arg(value_name = "DISPATCH_ID")]
    pub dispatch_id: String,
    /// Send it again, with a new Message-ID (the provider did not get it).
    #[arg(long)]
    pub resend: bool,
    /// Declare it sent (the provider's webmail shows it was accepted).
    #[arg(long)]
    pub mark_sent: bool,
}

/// Runs `pecgate show`.
///
/// # Errors
/// Configuration or store failures.
pub fn run_show(config: Option<&Path>, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    crate::timeline::run_show(config, &args.key, args.json)
}

/// Runs `pecgate resolve`.
///
/// # Errors
/// Configuration or store failures.
pub fn run_resolve(config: Option<&Path>, args: &ResolveArgs) -> anyhow::Result<ExitCode> {
    let what = if args.resend {
        crate::timeline::Resolution::Resend
    } else {
        crate::timeline::Resolution::MarkSent
    };
    crate::timeline::run_resolve(config, &args.dispatch_id, what)
}

/// Arguments of `pecgate list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only letters in this state (queued, sending, submitted, uncertain,
    /// accepted, not-accepted, refused, delivered, partially-delivered, failed).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only letters of this mailbox (its short name in the configuration).
    #[arg(long, value_name = "NAME")]
    pub mailbox: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pecgate sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Directory for everything (created if missing; certificates and
    /// passwords are reused when it exists).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Simulated seconds per real second for the providers' timers
    /// (3600: an hour per second).
    #[arg(long, value_name = "N", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Faults to inject (TOML, see docs/sandbox.md); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,
}

/// Arguments of `pecgate verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Use the PEM/DER certificates in DIR as trust anchors instead of the
    /// built-in PEC CAs (repeatable).
    #[arg(long, value_name = "DIR")]
    pub trust: Vec<PathBuf>,
    /// One JSON object per line per file instead of readable blocks.
    #[arg(long)]
    pub json: bool,
    /// Message files or directories (their `.eml` files, recursively, in name order).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Arguments of `pecgate inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// One JSON object per line per file instead of readable blocks.
    #[arg(long)]
    pub json: bool,
    /// Message files or directories (their `.eml` files, recursively, in name order).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// How a batch of files went, for grep-like exit statuses.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Some file had a problem (exit 1).
    pub problem: bool,
    /// Some file could not be read or is not a mail message (exit 2; wins).
    pub unreadable: bool,
}

impl Tally {
    /// The exit status: 2 if some file was unreadable, else 1 if some file
    /// had a problem, else 0.
    pub fn exit_code(self) -> ExitCode {
        if self.unreadable {
            ExitCode::from(2)
        } else if self.problem {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Runs `pecgate inspect`.
///
/// # Errors
/// Only on a failure to write the output (a closed pipe is not an error).
pub fn run_inspect(args: &InspectArgs) -> io::Result<ExitCode> {
    run_over_messages(&args.files, args.json, |path, ins, json| {
        let line = if json {
            json_line(path, ins, None)
        } else {
            render_human(path, ins)
        };
        (line, !ins.problems.is_empty())
    })
}

/// Runs `pecgate verify`.
///
/// # Errors
/// Trust anchors that cannot be loaded (reported as a configuration
/// error), or a failure to write the output.
pub fn run_verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let anchors = if args.trust.is_empty() {
        TrustAnchors::builtin()?
    } else {
        TrustAnchors::from_dirs(&args.trust)?
    };
    let verifier = Verifier::new(anchors);
    let now = jiff::Timestamp::now();
    Ok(run_over_messages(
        &args.files,
        args.json,
        |path, ins, json| {
            let verdict = verifier.verify(ins, now);
            let bad = !ins.problems.is_empty() || !verdict.is_valid();
            let line = if json {
                json_line(path, ins, Some(&verdict))
            } else {
                let mut block = render_human(path, ins);
                block.push_str(&render_verdict(&verdict));
                block
            };
            (line, bad)
        },
    )?)
}

/// Streams the files, one at a time, through `per_file` (which returns the
/// text to print and whether the file counts as a problem).
fn run_over_messages(
    files: &[PathBuf],
    json: bool,
    mut per_file: impl FnMut(&Path, &Inspection<'_>, bool) -> (String, bool),
) -> io::Result<ExitCode> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut tally = Tally::default();
    for_each_file(files, |path, bytes| {
        let line = match bytes {
            Err(e) => {
                tally.unreadable = true;
                render_error(path, &e, json)
            }
            Ok(raw) => match inspect(&raw) {
                Err(e) => {
                    tally.unreadable = true;
                    render_error(path, &e.to_string(), json)
                }
                Ok(ins) => {
                    let (line, bad) = per_file(path, &ins, json);
                    tally.problem |= bad;
                    line
                }
            },
        };
        writeln!(out, "{line}")
    })?;
    out.flush()?;
    Ok(tally.exit_code())
}

/// The signature lines of `verify`'s readable output.
pub fn render_verdict(v: &Verdict) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let status = match v.status {
        Status::Valid => "VALID",
        Status::Invalid => "INVALID",
        Status::Unsigned => "UNSIGNED",
    };
    let _ = writeln!(s, "  signature:       {status}");
    if let Some(r) = &v.reason {
        let _ = writeln!(s, "    reason:          {r}");
    }
    if let Some(x) = &v.signer_cn {
        let _ = writeln!(s, "    signer:          {x}");
    }
    if let Some(x) = &v.signer_email {
        let _ = writeln!(s, "    signer e-mail:   {x}");
    }
    if let Some(x) = &v.issuer_cn {
        let _ = writeln!(s, "    issuer:          {x}");
    }
    if let Some(x) = &v.serial {
        let _ = writeln!(s, "    serial:          {x}");
    }
    if let (Some(a), Some(b)) = (v.not_before, v.not_after) {
        let _ = writeln!(s, "    valid:           {} .. {}", rfc3339(a), rfc3339(b));
    }
    if let (Some(t), Some(src)) = (v.signed_at, v.signed_at_source) {
        let src = match src {
            TimeSource::SigningTime => "CMS signingTime",
            TimeSource::Daticert => "daticert date",
            TimeSource::Date => "Date header",
        };
        let _ = writeln!(s, "    signed at:       {} (from the {src})", rfc3339(t));
    }
    if let Some(e) = v.expired_now {
        let _ = writeln!(
            s,
            "    expired now:     {}",
            if e {
                "yes (valid for messages signed before)"
            } else {
                "no"
            }
        );
    }
    let _ = writeln!(s, "    revocation:      not checked (no CRL/OCSP yet)");
    s
}

/// One line of `inspect --json` / `verify --json`: the file first, then
/// the summary, then (verify only) the signature.
#[derive(Debug, serde::Serialize)]
struct JsonLine<'a> {
    file: String,
    #[serde(flatten)]
    summary: crate::pec::inspect::Summary<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a Verdict>,
}

fn json_line(path: &Path, ins: &Inspection<'_>, verdict: Option<&Verdict>) -> String {
    let line = JsonLine {
        file: path.display().to_string(),
        summary: ins.summary(),
        signature: verdict,
    };
    // Serialising plain data into a String cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// The JSON object of `inspect --json` for one file.
pub fn inspection_json(path: &Path, ins: &Inspection<'_>) -> serde_json::Value {
    serde_json::from_str(&json_line(path, ins, None)).unwrap_or_default()
}

/// The output for a file that could not be read.
pub fn render_error(path: &Path, error: &str, json: bool) -> String {
    if json {
        #[derive(serde::Serialize)]
        struct ErrorLine<'a> {
            file: String,
            error: &'a str,
        }
        let line = ErrorLine {
            file: path.display().to_string(),
            error,
        };
        serde_json::to_string(&line).unwrap_or_default()
    } else {
        format!("{}\n  error: {error}\n", path.display())
    }
}

/// The readable block of `inspect` for one file.
pub fn render_human(path: &Path, ins: &Inspection<'_>) -> String {
    use std::fmt::Write as _;
    let m = &ins.message;
    let mut s = String::new();
    let _ = writeln!(s, "{}", path.display());
    let _ = writeln!(s, "  kind:            {}", ins.kind());
    if let Some(v) = &m.classification.x_ricevuta {
        let _ = writeln!(s, "  X-Ricevuta:      {v}");
    }
    if let Some(v) = &m.classification.x_trasporto {
        let _ = writeln!(s, "  X-Trasporto:     {v}");
    }
    if let Some(v) = &m.classification.refers_to {
        let _ = writeln!(s, "  refers to:       <{v}>");
    }
    if let Some(v) = &m.from {
        let _ = writeln!(s, "  from:            {v}");
    }
    if let Some(v) = &m.subject {
        let _ = writeln!(s, "  subject:         {v}");
    }
    let _ = writeln!(s, "  signature form:  {}", m.signature.form());
    match &ins.daticert {
        Some(d) => {
            let _ = writeln!(s, "  daticert:        tipo={} errore={}", d.tipo, d.errore);
            let _ = writeln!(
                s,
                "    data:            {}",
                d.data.strftime("%Y-%m-%dT%H:%M:%SZ")
            );
            let _ = writeln!(s, "    identificativo:  {}", d.identificativo);
            if let Some(x) = &d.msgid {
                let _ = writeln!(s, "    msgid:           <{x}>");
            }
            if let Some(x) = &d.gestore_emittente {
                let _ = writeln!(s, "    gestore:         {x}");
            }
            if let Some(x) = &d.mittente {
                let _ = writeln!(s, "    mittente:        {x}");
            }
            for r in &d.destinatari {
                let _ = writeln!(s, "    destinatario:    {} ({})", r.address, r.tipo);
            }
            if let Some(x) = &d.oggetto {
                let _ = writeln!(s, "    oggetto:         {x}");
            }
            if let Some(x) = &d.ricevuta {
                let _ = writeln!(s, "    ricevuta:        {x}");
            }
            if let Some(x) = &d.consegna {
                let _ = writeln!(s, "    consegna:        {x}");
            }
            for x in &d.ricezione {
                let _ = writeln!(s, "    ricezione:       {x}");
            }
            if let Some(x) = &d.errore_esteso {
                let _ = writeln!(s, "    errore esteso:   {x}");
            }
        }
        None => {
            let _ = writeln!(s, "  daticert:        none");
        }
    }
    if let Some(p) = &m.postacert {
        let _ = writeln!(s, "  postacert.eml:   {} bytes", p.len());
    }
    for o in &m.others {
        let _ = writeln!(
            s,
            "  other part:      {} {} ({} bytes)",
            o.content_type,
            o.name.as_deref().unwrap_or("-"),
            o.size
        );
    }
    if ins.problems.is_empty() {
        let _ = writeln!(s, "  problems:        none");
    } else {
        for p in &ins.problems {
            let _ = writeln!(s, "  problem:         {p}");
        }
    }
    s
}

/// Calls `f` with each file named on the command line (directories are
/// walked recursively in name order, taking their `.eml` files), one at a time, so memory stays
/// bounded by the largest file. Read errors are passed to `f` as text.
///
/// # Errors
/// The first error returned by `f`.
pub fn for_each_file(
    paths: &[PathBuf],
    mut f: impl FnMut(&Path, Result<Vec<u8>, String>) -> io::Result<()>,
) -> io::Result<()> {
    for path in paths {
        if path.is_dir() {
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                let mut entries = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .collect::<Vec<_>>(),
                    Err(e) => {
                        f(&dir, Err(format!("cannot read directory: {e}")))?;
                        continue;
                    }
                };
                entries.sort();
                // Files of this directory first, in order; then subdirectories.
                let (dirs, files): (Vec<_>, Vec<_>) = entries.into_iter().partition(|p| p.is_dir());
                for file in files.into_iter().filter(|p| is_eml(p)) {
                    f(&file, read_message_file(&file))?;
                }
                stack.extend(dirs.into_iter().rev());
            }
        } else {
            f(path, read_message_file(path))?;
        }
    }
    Ok(())
}

/// Whether a file found while walking a directory is a saved message.
fn is_eml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("eml"))
}

/// Reads a whole message file, refusing files larger than
/// [`MAX_MESSAGE_BYTES`].
pub fn read_message_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "too large: {} bytes (at most {MAX_MESSAGE_BYTES})",
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

/// Runs `pecgate sandbox` until SIGINT/SIGTERM.
///
/// # Errors
/// Start-up failures (Dovecot missing, ports, files).
pub fn run_sandbox(args: &SandboxArgs) -> anyhow::Result<ExitCode> {
    if !(args.time_scale.is_finite() && args.time_scale >= 1.0) {
        anyhow::bail!(
            "--time-scale must be a number >= 1 (got {})",
            args.time_scale
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::sandbox::run_command(
        crate::sandbox::SandboxOptions {
            dir: args.dir.clone(),
            time_scale: args.time_scale,
            faults: args.faults.clone(),
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `pecgate list`.
///
/// # Errors
/// Configuration or store failures.
pub fn run_list(config: Option<&Path>, args: &ListArgs) -> anyhow::Result<ExitCode> {
    use std::ops::ControlFlow;
    let (config, _) = crate::config::Config::load(config)?;
    // Read-only: never creates a database (an empty one would make
    // `pecgate reindex` refuse) and never competes with the daemon's writes.
    if !config.store.database.exists() {
        eprintln!(
            "pecgate list: no database yet at {} (the daemon creates it): no letters",
            config.store.database.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let db = crate::store::Db::open_read_only(&config.store.database)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut failure: Option<io::Error> = None;
    if !args.json {
        writeln!(
            out,
            "{:<26}  {:<12}  {:<20}  {:<12}  {:<16}  subject",
            "dispatch_id", "mailbox", "state", "kind", "protocol"
        )?;
    }
    db.list(args.state.as_deref(), args.mailbox.as_deref(), |d| {
        let line = if args.json {
            list_json(&d).to_string()
        } else {
            format!(
                "{:<26}  {:<12}  {:<20}  {:<12}  {:<16}  {}",
                d.dispatch.id,
                d.dispatch.mailbox,
                d.dispatch.state,
                d.dispatch.kind,
                d.dispatch.protocol.as_deref().unwrap_or("-"),
                d.dispatch.subject
            )
        };
        match writeln!(out, "{line}") {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The JSON object of `pecgate list --json` for one letter.
pub fn list_json(d: &crate::store::DispatchDetail) -> serde_json::Value {
    let r = &d.dispatch;
    let ts = |t: jiff::Timestamp| crate::sent::ts(t);
    serde_json::json!({
        "dispatch_id": r.id,
        "mailbox": r.mailbox,
        "state": r.state,
        "kind": r.kind,
        "protocol": r.protocol,
        "reference": r.reference,
        "subject": r.subject,
        "message_id": d.attempts.last().map(|a| a.message_id.clone()),
        "identificativo": r.identificativo,
        "created_at": ts(r.created_at),
        "updated_at": ts(r.updated_at),
        "sent_dir": r.sent_dir,
        "recipients": d.recipients.iter().map(|x| serde_json::json!({
            "address": x.address,
            "field": match x.field { crate::store::Field::To => "to", crate::store::Field::Cc => "cc" },
            "certified": x.certified,
            "state": x.state,
        })).collect::<Vec<_>>(),
    })
}

/// Arguments of `pecgate status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pecgate report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The month of submission, YYYY-MM (Europe/Rome).
    #[arg(long, value_name = "YYYY-MM")]
    pub month: crate::report::Month,
    /// One JSON object.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV: one row per recipient to reach on paper.
    #[arg(long)]
    pub csv: bool,
}

/// Arguments of `pecgate backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The backup directory: new or empty.
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,
}

/// Arguments of `pecgate restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A backup directory written by `pecgate backup` (or a scheduled backup).
    #[arg(value_name = "SRC")]
    pub src: PathBuf,
    /// Replace an existing database, and files whose content differs from the backup's.
    #[arg(long)]
    pub force: bool,
}

/// Runs `pecgate status`.
///
/// # Errors
/// Configuration or store failures, or a failure to write the output.
pub fn run_status(config: Option<&Path>, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = crate::config::Config::load(config)?;
    let db = crate::store::Db::open_read_only(&config.store.database)?;
    let status = crate::status::collect(&config, &db, jiff::Timestamp::now())?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string(&status)?)
    } else {
        crate::status::render_human(&status)
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `pecgate report`.
///
/// # Errors
/// Configuration or store failures, or a failure to write the output.
pub fn run_report(config: Option<&Path>, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = crate::config::Config::load(config)?;
    let db = crate::store::Db::open_read_only(&config.store.database)?;
    let price = config.report.unit_price_cents;
    let names: Vec<String> = config.mailboxes.keys().cloned().collect();
    let report = crate::report::load(&db, args.month, price, &names)?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string(&report)?)
    } else if args.csv {
        crate::report::render_csv(&report)?
    } else {
        crate::report::render_human(&report, price)
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `pecgate backup`.
///
/// # Errors
/// Configuration, store or file-system failures; a non-empty DEST.
pub fn run_backup(config: Option<&Path>, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = crate::config::Config::load(config)?;
    let s = crate::backup::backup(&config, &args.dest, jiff::Timestamp::now())?;
    println!(
        "backup written to {}: {} files, {} bytes ({} lists them)",
        s.dest.display(),
        s.files,
        s.bytes,
        crate::backup::MANIFEST
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `pecgate restore`.
///
/// # Errors
/// A corrupt backup (nothing touched), a refusal (daemon running, existing
/// database without --force), configuration or file-system failures.
pub fn run_restore(config: Option<&Path>, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = crate::config::Config::load(config)?;
    let s = crate::backup::restore(&config, &args.src, args.force)?;
    println!(
        "restored from {}: {} files written ({} bytes), {} already in place; database {}",
        args.src.display(),
        s.written,
        s.bytes,
        s.unchanged,
        config.store.database.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `pecgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the sandbox, the gateway's files and the letters
    /// (created if missing, reused if present; default: a new directory
    /// under the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Exit by itself once every letter is final: 0, or 1 when the timeout
    /// passes first.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Seconds to wait for every letter to be final after they are dropped.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::demo::DEFAULT_TIMEOUT.as_secs_f64())]
    pub timeout: f64,
}

/// Runs `pecgate demo`.
///
/// # Errors
/// A bad `--timeout`; start-up failures (Dovecot missing, the directory,
/// the gateway).
pub fn run_demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 86_400.0) {
        anyhow::bail!(
            "--timeout must be a number of seconds between 0 and 86400 (got {})",
            args.timeout
        );
    }
    crate::demo::run(&crate::demo::DemoOptions {
        dir: args.dir.clone(),
        exit_when_done: args.exit_when_done,
        timeout: std::time::Duration::from_secs_f64(args.timeout),
    })
}

/// Arguments of `pecgate reindex`.
#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// Move an existing database (and its -wal/-shm) aside to
    /// `<db>.before-reindex-<time>` and rebuild anyway (nothing is deleted).
    #[arg(long)]
    pub force: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pecgate reindex`: exit 0 when everything was restored, 1 when some
/// file could not be (listed).
///
/// # Errors
/// Configuration or trust anchor problems, a refusal (a database exists
/// without --force, the daemon holds it), or a failure that stopped the
/// rebuild (no database is left then).
pub fn run_reindex(config: Option<&Path>, args: &ReindexArgs) -> anyhow::Result<ExitCode> {
    let (config, _) = crate::config::Config::load(config)?;
    let anchors = if config.trust.anchors.is_empty() {
        TrustAnchors::builtin()?
    } else {
        TrustAnchors::from_dirs(&config.trust.anchors)?
    };
    let verifier = Verifier::new(anchors);
    let options = crate::reindex::Options { force: args.force };
    let s = crate::reindex::reindex(&config, &verifier, options, jiff::Timestamp::now())?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string(&s)?)
    } else {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(t, "database rebuilt: {}", s.database);
        for m in &s.moved_aside {
            let _ = writeln!(t, "  moved aside: {m}");
        }
        let _ = writeln!(
            t,
            "  letters restored: {} ({} attempts; {} in progress when recorded, now uncertain)",
            s.letters, s.attempts, s.uncertain
        );
        let _ = writeln!(t, "  sent messages: {}", s.sent_messages);
        let _ = writeln!(t, "  receipts applied: {}", s.receipts_applied);
        let _ = writeln!(t, "  orphan receipts: {}", s.orphans);
        let _ = writeln!(t, "  quarantined: {}", s.quarantined);
        let _ = writeln!(
            t,
            "  incoming certified mail: {} (anomalies: {})",
            s.incoming, s.anomalies
        );
        let _ = writeln!(t, "  other messages: {}", s.other_messages);
        if s.problems.is_empty() {
            let _ = writeln!(t, "everything was restored");
        } else {
            let _ = writeln!(t, "problems ({}):", s.problems.len());
            for p in &s.problems {
                let _ = writeln!(t, "  {}: {}", p.path, p.problem);
            }
        }
        t
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(if s.is_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
