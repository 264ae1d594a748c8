//! `pecgate demo`: the whole gateway at work in one command.
//!
//! It starts a PEC sandbox in-process ([`crate::sandbox::Sandbox`]) in a
//! directory, the daemon as a child process (`pecgate --config
//! DIR/pecgate.toml --log-format json run`, its log in `DIR/pecgate.log`),
//! then drops sample letters into the outbox as a clerk would (each file
//! written under a hidden name and renamed, the envelope last):
//!
//! | letter | what happens |
//! |---|---|
//! | `certificato` | a certificate with a PDF document to a citizen → `delivered` |
//! | `raccomandata` | to a citizen, cc an ordinary address → `delivered` (the ordinary one is `external`) |
//! | `sconosciuto` | to an address that does not exist in a PEC domain → `errore-consegna`, `failed` |
//! | `mancante` | names a document that never arrives → `outbox/rejected/NAME/` with `NAME.error.txt` |
//! | `tari` | a mass mailing: a CSV of 3 rows and a template → 3 letters `delivered` |
//!
//! It shows one line per state change, read from the store every
//! [`POLL`] (never from the daemon's log), and ends with a table of each
//! letter, its recipients, its final state and its proof files.
//!
//! Every run has a tag (its local time, `YYYYMMDD-HHMMSS`) in its file
//! names, subjects and references, so that a second run in the same
//! directory makes new letters (no duplicate refusal) and follows only its
//! own. The pure parts ([`plan`], [`progress_lines`], [`render_table`]) take
//! everything, time included, as arguments; [`run`] does the I/O.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use crate::pec::state::{DispatchState, RecipientState};
use crate::store::{Db, DispatchDetail};

/// Prints a line on stdout; a closed stdout (`pecgate demo | head`) does not
/// stop the demo, which still runs to its end and stops what it started.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Like [`say!`], without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// A line on stderr (`pecgate demo: ...`), never panicking.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// How long `--exit-when-done` waits, by default, for every letter to be final.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The sandbox's time scale: an hour a second, so that the providers' 12 h
/// and 24 h notices (and the gateway's deadlines, which follow them) fit
/// into a demo.
pub const TIME_SCALE: f64 = 3600.0;
/// How often the store is read for progress.
pub const POLL: Duration = Duration::from_millis(300);
/// The daemon's log, in the demo directory.
pub const LOG_FILE: &str = "pecgate.log";
/// How long the daemon may take to create its database at start.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long the daemon may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How far back the envelope of the letter with a missing document is
/// dated: just past the hour pecgate waits for missing files
/// (`outbox::intake::DEFAULT_MISSING_GRACE`).
const BACKDATE: Duration = Duration::from_secs(61 * 60);

/// The sandbox's fictional addresses used by the demo (docs/sandbox.md).
pub mod address {
    /// A citizen of provider due.
    pub const MARIO: &str = "mario.rossi@pec.cittadini.sandbox.test";
    /// A citizen of provider due.
    pub const GIULIA: &str = "giulia.bianchi@pec.cittadini.sandbox.test";
    /// A citizen of provider due.
    pub const LUCA: &str = "luca.verdi@pec.cittadini.sandbox.test";
    /// A citizen of provider uno (the office's provider).
    pub const ANAGRAFE: &str = "anagrafe@pec.comune.sandbox.test";
    /// An ordinary (non-PEC) mailbox.
    pub const PAOLO: &str = "paolo.gialli@posta.sandbox.test";
    /// An address in a PEC domain that has no mailbox.
    pub const NOBODY: &str = "nessuno@pec.cittadini.sandbox.test";
}

/// What `pecgate demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The directory (created if missing, reused if present); `None`: a
    /// fresh one under the system's temporary directory.
    pub dir: Option<PathBuf>,
    /// Stop by itself once every letter is final (or the timeout passed).
    pub exit_when_done: bool,
    /// How long to wait for every letter to be final, from the moment the
    /// letters are dropped.
    pub timeout: Duration,
}

// ---------------------------------------------------------------------------
// The plan: the sample letters of one run (pure)

/// A file to drop into the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropFile {
    /// Its name in the outbox.
    pub name: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its modification time this far in the past (`None`: now).
    pub backdate: Option<Duration>,
}

/// A letter the demo expects in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedLetter {
    /// Short name shown in the progress lines and the table.
    pub label: String,
    /// The envelope stem it comes from (`outbox/rejected/STEM` if refused).
    pub stem: String,
    /// Its `reference`, which finds it in the store.
    pub reference: String,
    /// The final state it should reach.
    pub expected: DispatchState,
}

/// A letter the demo expects pecgate to refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedRejection {
    /// Short name.
    pub label: String,
    /// The envelope stem: the refusal is `outbox/rejected/STEM/STEM.error.txt`.
    pub stem: String,
    /// Why it is refused, in words.
    pub why: String,
}

/// The sample letters of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The run's tag (in file names, subjects, references).
    pub tag: String,
    /// The files, in the order to drop them (documents, CSV, envelope last,
    /// per letter).
    pub files: Vec<DropFile>,
    /// The letters to follow.
    pub letters: Vec<ExpectedLetter>,
    /// The refusals to expect.
    pub rejections: Vec<ExpectedRejection>,
}

/// The run's tag from a time: `YYYYMMDD-HHMMSS`, Europe/Rome.
pub fn tag_for(now: jiff::Timestamp) -> String {
    let tz = jiff::tz::TimeZone::get("Europe/Rome").unwrap_or(jiff::tz::TimeZone::UTC);
    now.to_zoned_datetime(tz)
        .strftime("%Y%m%d-%H%M%S")
        .to_string()
}

/// The sample letters for the run tagged `tag`.
pub fn plan(tag: &str) -> Plan {
    use address::*;
    let p = |s: &str| format!("demo-{tag}-{s}");
    let mut files = Vec::new();
    let mut letters = Vec::new();
    let add = |files: &mut Vec<DropFile>, name: String, bytes: Vec<u8>| {
        files.push(DropFile {
            name,
            bytes,
            backdate: None,
        });
    };

    // 1. A certificate with a PDF document.
    let pdf = p("certificato-residenza-rossi.pdf");
    add(
        &mut files,
        pdf.clone(),
        pdf_document(&[
            "Comune di Sandbox - Ufficio Anagrafe",
            "Certificato di residenza",
            "Si certifica che Mario Rossi risiede in questo Comune.",
            &format!("(pecgate demo {tag})"),
        ]),
    );
    add(
        &mut files,
        format!("{}.toml", p("certificato")),
        format!(
            r#"to = ["{MARIO}"]
subject = "Certificato di residenza (demo {tag})"
body = """
Gentile signor Rossi,

come richiesto, Le trasmettiamo in allegato il certificato di residenza.

Cordiali saluti
Ufficio Anagrafe
"""
attachments = ["{pdf}"]
kind = "certificato"
protocol = "DEMO/{tag}/1"
reference = "{reference}"
receipt = "completa"
"#,
            reference = p("certificato"),
        )
        .into_bytes(),
    );
    letters.push(expected(
        "certificato",
        &p("certificato"),
        &p("certificato"),
        DispatchState::Delivered,
    ));

    // 2. A registered letter: a citizen, and in copy an ordinary address.
    let notice = p("verbale-sopralluogo.pdf");
    add(
        &mut files,
        notice.clone(),
        pdf_document(&[
            "Comune di Sandbox - Ufficio Tecnico",
            "Verbale di sopralluogo",
            &format!("(pecgate demo {tag})"),
        ]),
    );
    add(
        &mut files,
        format!("{}.toml", p("raccomandata")),
        format!(
            r#"to = ["{GIULIA}"]
cc = ["{PAOLO}"]
subject = "Comunicazione di avvio del procedimento (demo {tag})"
body = """
Gentile signora Bianchi,

Le comunichiamo l'avvio del procedimento relativo alla Sua pratica edilizia;
il verbale di sopralluogo è in allegato. Per conoscenza al tecnico incaricato.

Ufficio Tecnico
"""
attachments = ["{notice}"]
kind = "raccomandata"
protocol = "DEMO/{tag}/2"
reference = "{reference}"
receipt = "breve"
"#,
            reference = p("raccomandata"),
        )
        .into_bytes(),
    );
    letters.push(expected(
        "raccomandata",
        &p("raccomandata"),
        &p("raccomandata"),
        DispatchState::Delivered,
    ));

    // 3. An address that does not exist in a PEC domain.
    add(
        &mut files,
        format!("{}.toml", p("sconosciuto")),
        format!(
            r#"to = ["{NOBODY}"]
subject = "Avviso a un indirizzo inesistente (demo {tag})"
body = "Questa lettera non può essere consegnata: la casella non esiste."
kind = "avviso"
reference = "{reference}"
"#,
            reference = p("sconosciuto"),
        )
        .into_bytes(),
    );
    letters.push(expected(
        "sconosciuto",
        &p("sconosciuto"),
        &p("sconosciuto"),
        DispatchState::Failed,
    ));

    // 4. A letter whose document never arrives: its envelope is dated just
    // past the hour pecgate waits for missing files, so it is refused now.
    files.push(DropFile {
        name: format!("{}.toml", p("mancante")),
        bytes: format!(
            r#"to = ["{LUCA}"]
subject = "Determina con allegato mancante (demo {tag})"
body = "In allegato la determina."
attachments = ["{missing}"]
kind = "altro"
reference = "{reference}"
"#,
            missing = p("determina.pdf"),
            reference = p("mancante"),
        )
        .into_bytes(),
        backdate: Some(BACKDATE),
    });
    let rejections = vec![ExpectedRejection {
        label: "mancante".to_owned(),
        stem: p("mancante"),
        why: format!(
            "its document {} never arrived (envelope dated {} minutes ago; pecgate waits an hour)",
            p("determina.pdf"),
            BACKDATE.as_secs() / 60
        ),
    }];

    // 5. A mass mailing: a CSV of three rows and a template.
    let info = p("informativa-tari.pdf");
    add(
        &mut files,
        info.clone(),
        pdf_document(&[
            "Comune di Sandbox - Ufficio Tributi",
            "Informativa TARI",
            &format!("(pecgate demo {tag})"),
        ]),
    );
    let rows = [
        (ANAGRAFE, "Ufficio Anagrafe", "000123"),
        (LUCA, "Luca Verdi", "000124"),
        (MARIO, "Mario Rossi", "000125"),
    ];
    let mut csv = String::from("to;nominativo;numero;attachment\n");
    for (to, name, number) in rows {
        let doc = p(&format!("avviso-{number}.pdf"));
        add(
            &mut files,
            doc.clone(),
            pdf_document(&[
                "Comune di Sandbox - Ufficio Tributi",
                &format!("Avviso di pagamento TARI n. {number}"),
                &format!("Intestatario: {name}"),
                &format!("(pecgate demo {tag})"),
            ]),
        );
        let _ = writeln!(csv, "{to};{name};{number};{doc}");
        letters.push(expected(
            &format!("tari {number}"),
            &p("tari"),
            &p(&format!("tari-{number}")),
            DispatchState::Delivered,
        ));
    }
    add(&mut files, format!("{}.csv", p("tari")), csv.into_bytes());
    add(
        &mut files,
        format!("{}.toml", p("tari")),
        format!(
            r#"subject = "Avviso di pagamento TARI n. {{numero}} (demo {tag})"
body = """
Gentile {{nominativo}},

in allegato l'avviso di pagamento n. {{numero}} della tassa sui rifiuti
e l'informativa del Comune.

Ufficio Tributi
"""
attachments = ["{info}"]
kind = "tributi"
reference = "{prefix}-{{numero}}"
receipt = "sintetica"
"#,
            prefix = p("tari"),
        )
        .into_bytes(),
    );

    Plan {
        tag: tag.to_owned(),
        files,
        letters,
        rejections,
    }
}

fn expected(label: &str, stem: &str, reference: &str, state: DispatchState) -> ExpectedLetter {
    ExpectedLetter {
        label: label.to_owned(),
        stem: stem.to_owned(),
        reference: reference.to_owned(),
        expected: state,
    }
}

/// A small, valid one-page PDF showing `lines` (ASCII; other characters
/// become `?`).
pub fn pdf_document(lines: &[&str]) -> Vec<u8> {
    let mut text = String::from("BT /F1 12 Tf 56 780 Td 16 TL\n");
    for l in lines {
        let escaped: String = l
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    c
                } else {
                    '?'
                }
            })
            .flat_map(|c| match c {
                '(' | ')' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let _ = writeln!(text, "({escaped}) Tj T*");
    }
    text.push_str("ET\n");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] \
         /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>"
            .to_owned(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{text}endstream", text.len()),
    ];
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    let mut tail = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for off in offsets {
        let _ = writeln!(tail, "{off:010} 00000 n ");
    }
    let _ = write!(
        tail,
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    );
    out.extend_from_slice(tail.as_bytes());
    out
}

// ---------------------------------------------------------------------------
// Dropping the letters (I/O)

/// Writes the plan's files into `outbox` as a careful clerk's program does:
/// each under a hidden temporary name, its modification time set, then
/// renamed into place (in the plan's order: documents, CSV, envelope last).
///
/// # Errors
/// File-system failures (the message names the file).
pub fn drop_files(outbox: &Path, plan: &Plan, now: SystemTime) -> anyhow::Result<()> {
    for f in &plan.files {
        let tmp = outbox.join(format!(".{}.part", f.name));
        let target = outbox.join(&f.name);
        fs::write(&tmp, &f.bytes).with_context(|| format!("writing {}", tmp.display()))?;
        if let Some(age) = f.backdate {
            let when = now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
            fs::File::options()
                .write(true)
                .open(&tmp)
                .and_then(|h| h.set_modified(when))
                .with_context(|| format!("dating {}", tmp.display()))?;
        }
        fs::rename(&tmp, &target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Observing (store + folders)

/// What is known about one expected letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LetterStatus {
    /// What was expected.
    pub expected: ExpectedLetter,
    /// The letter in the store, once taken in.
    pub detail: Option<DispatchDetail>,
    /// The proof files in its sent folder (receipts, in order).
    pub proofs: Vec<String>,
    /// Its refusal file, if pecgate refused it (not expected).
    pub rejected: Option<PathBuf>,
}

impl LetterStatus {
    /// Its dispatch state (`None` before it is taken in).
    pub fn state(&self) -> Option<&str> {
        self.detail.as_ref().map(|d| d.dispatch.state.as_str())
    }

    /// Nothing more is expected for it: a final dispatch state, or
    /// `accepted` with only external recipients (`Dispatch::is_final`).
    pub fn is_final(&self) -> bool {
        self.detail.as_ref().is_some_and(dispatch_is_final)
    }
}

/// `Dispatch::is_final` on a stored letter.
pub fn dispatch_is_final(d: &DispatchDetail) -> bool {
    match DispatchState::from_str(&d.dispatch.state) {
        Ok(s) if s.is_final() => true,
        Ok(DispatchState::Accepted) => d
            .recipients
            .iter()
            .all(|r| RecipientState::from_str(&r.state) == Ok(RecipientState::External)),
        _ => false,
    }
}

/// What is known about one expected refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionStatus {
    /// What was expected.
    pub expected: ExpectedRejection,
    /// `outbox/rejected/STEM/STEM.error.txt` (whether or not it exists yet).
    pub error_file: PathBuf,
    /// Its first line, once it exists.
    pub first_line: Option<String>,
    /// Its first numbered problem (`1. [field] ...`), once it exists.
    pub first_problem: Option<String>,
}

/// One look at the store and the folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// One per expected letter, in plan order.
    pub letters: Vec<LetterStatus>,
    /// One per expected refusal.
    pub rejections: Vec<RejectionStatus>,
}

impl Observation {
    /// Every letter is final and every refusal file exists.
    pub fn is_done(&self) -> bool {
        self.letters.iter().all(LetterStatus::is_final)
            && self.rejections.iter().all(|r| r.first_line.is_some())
    }

    /// Nothing more will happen: every letter is final or was refused
    /// against expectations, and every refusal file exists.
    pub fn is_settled(&self) -> bool {
        self.letters
            .iter()
            .all(|l| l.is_final() || l.rejected.is_some())
            && self.rejections.iter().all(|r| r.first_line.is_some())
    }

    /// One line per letter or refusal that is not final, saying where it is.
    pub fn not_final(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.letters {
            if l.is_final() {
                continue;
            }
            let where_ = match (&l.detail, &l.rejected) {
                (Some(d), _) => format!("state {}", d.dispatch.state),
                (None, Some(p)) => format!("refused by pecgate: see {}", p.display()),
                (None, None) => "not taken in yet (still in the outbox?)".to_owned(),
            };
            out.push(format!(
                "{} ({}): {where_}",
                l.expected.label, l.expected.reference
            ));
        }
        for r in &self.rejections {
            if r.first_line.is_none() {
                out.push(format!(
                    "{}: no refusal file yet ({})",
                    r.expected.label,
                    r.error_file.display()
                ));
            }
        }
        out
    }
}

/// Reads the store and the folders for the letters of `plan`.
///
/// # Errors
/// Store failures.
pub fn observe(db: &Db, outbox: &Path, plan: &Plan) -> anyhow::Result<Observation> {
    let prefix = format!("demo-{}-", plan.tag);
    let mut found: HashMap<String, DispatchDetail> = HashMap::new();
    db.list(None, None, |d| {
        if let Some(r) = &d.dispatch.reference
            && r.starts_with(&prefix)
        {
            found.insert(r.clone(), d);
        }
        ControlFlow::Continue(())
    })?;
    let rejected_dir = outbox.join(crate::outbox::intake::REJECTED_DIR);
    let error_file = |stem: &str| rejected_dir.join(stem).join(format!("{stem}.error.txt"));
    let letters = plan
        .letters
        .iter()
        .map(|e| {
            let detail = found.remove(&e.reference);
            let proofs = detail
                .as_ref()
                .map(|d| proof_files(Path::new(&d.dispatch.sent_dir)))
                .unwrap_or_default();
            let rejected = if detail.is_none() {
                Some(error_file(&e.stem)).filter(|p| p.is_file())
            } else {
                None
            };
            LetterStatus {
                expected: e.clone(),
                detail,
                proofs,
                rejected,
            }
        })
        .collect();
    let rejections = plan
        .rejections
        .iter()
        .map(|e| {
            let path = error_file(&e.stem);
            let text = fs::read_to_string(&path).ok();
            RejectionStatus {
                expected: e.clone(),
                first_line: text
                    .as_deref()
                    .map(|t| t.lines().next().unwrap_or_default().to_owned()),
                first_problem: text
                    .as_deref()
                    .and_then(|t| t.lines().find(|l| l.starts_with("1. ")).map(str::to_owned)),
                error_file: path,
            }
        })
        .collect();
    Ok(Observation {
        letters,
        rejections,
    })
}

/// The receipts filed in a sent folder (`NN-<kind>[-<recipient>].eml`,
/// NN ≥ 01), in order.
pub fn proof_files(sent_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(sent_dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.ends_with(".eml")
                        && n.as_bytes().get(2) == Some(&b'-')
                        && n.get(..2)
                            .and_then(|p| p.parse::<u32>().ok())
                            .is_some_and(|k| k > 0)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// Showing (pure)

/// The progress lines for what changed since the last call (`seen` keeps
/// the states already shown): a letter taken in or changing state, a
/// recipient changing state, a refusal file appearing. `elapsed` is the time
/// since the letters were dropped.
pub fn progress_lines(
    seen: &mut HashMap<String, String>,
    obs: &Observation,
    elapsed: Duration,
) -> Vec<String> {
    let t = format!("[{:>5.1}s]", elapsed.as_secs_f64());
    let mut out = Vec::new();
    let mut note = |key: String, value: String, line: &dyn Fn(Option<&str>) -> String| {
        let old = seen.get(&key).cloned();
        if old.as_deref() != Some(value.as_str()) {
            out.push(format!("{t} {}", line(old.as_deref())));
            seen.insert(key, value);
        }
    };
    for l in &obs.letters {
        let label = &l.expected.label;
        if let Some(d) = &l.detail {
            let state = d.dispatch.state.clone();
            note(format!("letter {label}"), state.clone(), &|old| match old {
                None => format!("{label:<14} taken in: {state}"),
                Some(o) => format!("{label:<14} {o} -> {state}"),
            });
            for r in &d.recipients {
                let rs = r.state.clone();
                let addr = &r.address;
                note(
                    format!("recipient {label} {addr}"),
                    rs.clone(),
                    &|old| match old {
                        None if rs == "pending" => String::new(),
                        None => format!("{label:<14}   {addr}: {rs}"),
                        Some(o) => format!("{label:<14}   {addr}: {o} -> {rs}"),
                    },
                );
            }
        } else if let Some(p) = &l.rejected {
            note(format!("letter {label}"), "refused".to_owned(), &|_| {
                format!(
                    "{label:<14} REFUSED by pecgate (unexpected): {}",
                    p.display()
                )
            });
        }
    }
    for r in &obs.rejections {
        if let Some(first) = &r.first_line {
            let label = &r.expected.label;
            note(format!("rejection {label}"), "refused".to_owned(), &|_| {
                format!("{label:<14} refused: {first}")
            });
        }
    }
    // A new recipient still pending is not news: drop the empty lines.
    out.retain(|l| l.len() > t.len() + 1);
    out
}

/// The final table: each letter (subject, recipients, state) with its sent
/// folder and receipt files, then each refusal with its error file's first
/// lines. Paths are shown relative to `dir` when under it.
pub fn render_table(obs: &Observation, dir: &Path) -> String {
    let rel = |p: &Path| {
        p.strip_prefix(dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let mut s = String::new();
    let _ = writeln!(s, "{:<14} {:<20} subject", "letter", "state");
    let _ = writeln!(s, "{}", "-".repeat(78));
    for l in &obs.letters {
        let label = &l.expected.label;
        match &l.detail {
            Some(d) => {
                let state = &d.dispatch.state;
                let mark = if state == l.expected.expected.as_str() {
                    String::new()
                } else {
                    format!("  (expected {})", l.expected.expected)
                };
                let _ = writeln!(s, "{label:<14} {state:<20} {}{mark}", d.dispatch.subject);
                for r in &d.recipients {
                    let note = match r.state.as_str() {
                        "external" => "  (ordinary address: no delivery receipt)",
                        _ => "",
                    };
                    let detail = r
                        .detail
                        .as_deref()
                        .filter(|_| r.state == "failed")
                        .map(|x| format!("  ({x})"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        s,
                        "{:<14}   {:<3} {:<44} {}{note}{detail}",
                        "",
                        r.field.as_str(),
                        r.address,
                        r.state
                    );
                }
                let _ = writeln!(
                    s,
                    "{:<14}   sent folder: {}/",
                    "",
                    rel(Path::new(&d.dispatch.sent_dir))
                );
                if l.proofs.is_empty() {
                    let _ = writeln!(s, "{:<14}   receipts: none yet", "");
                }
                for p in &l.proofs {
                    let _ = writeln!(s, "{:<14}   receipt: {p}", "");
                }
            }
            None => {
                let state = if l.rejected.is_some() {
                    "REFUSED"
                } else {
                    "not taken in"
                };
                let _ = writeln!(
                    s,
                    "{label:<14} {state:<20} ({}; expected {})",
                    l.expected.reference, l.expected.expected
                );
                if let Some(p) = &l.rejected {
                    let _ = writeln!(s, "{:<14}   see {}", "", rel(p));
                }
            }
        }
    }
    for r in &obs.rejections {
        let label = &r.expected.label;
        let state = if r.first_line.is_some() {
            "rejected"
        } else {
            "not rejected yet"
        };
        let _ = writeln!(s, "{label:<14} {state:<20} {}", r.expected.why);
        let _ = writeln!(s, "{:<14}   error file: {}", "", rel(&r.error_file));
        if let Some(first) = &r.first_line {
            let _ = writeln!(s, "{:<14}   {first}", "");
        }
        if let Some(p) = &r.first_problem {
            let _ = writeln!(s, "{:<14}   {p}", "");
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Running (I/O)

/// Runs `pecgate demo` to the end: exit status 0 when every letter is final
/// (with `--exit-when-done`, or after Ctrl-C), 1 when the timeout passed
/// first or something went wrong, 130 when interrupted before the end.
///
/// # Errors
/// Start-up failures (Dovecot missing, the directory, the daemon).
pub fn run(opts: &DemoOptions) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(opts))
}

/// The outcome of waiting for the letters.
enum Waited {
    Done,
    Settled,
    TimedOut,
    Interrupted,
    DaemonExited,
}

async fn run_async(opts: &DemoOptions) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let mut tag = tag_for(jiff::Timestamp::now());
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pecgate-demo-{tag}-{}", std::process::id())),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    // A run in the same directory within the same second: wait for a new tag
    // (the letters of two runs must differ, or the second would be refused
    // as duplicates).
    while dir
        .join("outbox")
        .join(crate::outbox::intake::REJECTED_DIR)
        .join(format!("demo-{tag}-mancante"))
        .exists()
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tag = tag_for(jiff::Timestamp::now());
    }
    say!("pecgate demo {tag}: everything lives in {}", dir.display());
    say!(
        "  starting the PEC sandbox (two simulated providers on a real Dovecot, {TIME_SCALE}x time)..."
    );
    let sandbox = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions {
        dir: dir.clone(),
        time_scale: TIME_SCALE,
        faults: None,
    })
    .await
    .context("starting the PEC sandbox")?;

    let config = dir.join("pecgate.toml");
    let log = dir.join(LOG_FILE);
    let mut daemon = match spawn_daemon(&config, &log) {
        Ok(c) => c,
        Err(e) => {
            sandbox.shutdown().await;
            return Err(e);
        }
    };
    say!(
        "  starting the gateway: pecgate --config {} run (log: {})",
        config.display(),
        log.display()
    );

    let outcome = follow(opts, &dir, &tag, &mut daemon, &mut int, &mut term).await;

    // Stop everything, whatever happened.
    let daemon_status = stop_daemon(&mut daemon, &mut int).await;
    sandbox.shutdown().await;
    let (waited, obs) = outcome?;
    match &daemon_status {
        Ok(Some(st)) if !st.success() => complain!("pecgate demo: the gateway exited with {st}"),
        Ok(_) => {}
        Err(e) => complain!("pecgate demo: stopping the gateway: {e:#}"),
    }
    say!(
        "stopped: the gateway and the sandbox. The files stay in {}",
        dir.display()
    );
    let code = match waited {
        Waited::Done => 0,
        Waited::Interrupted if obs.as_ref().is_some_and(Observation::is_done) => 0,
        Waited::Interrupted => 130,
        Waited::Settled | Waited::TimedOut | Waited::DaemonExited => 1,
    };
    Ok(ExitCode::from(code))
}

/// Waits for the daemon's store, drops the letters, follows them, prints the
/// table; without `--exit-when-done` waits for Ctrl-C afterwards.
async fn follow(
    opts: &DemoOptions,
    dir: &Path,
    tag: &str,
    daemon: &mut tokio::process::Child,
    int: &mut tokio::signal::unix::Signal,
    term: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<(Waited, Option<Observation>)> {
    let log = dir.join(LOG_FILE);
    let database = dir.join("pecgate.db");
    // The daemon creates (or migrates) the store at start: wait for it.
    let started = Instant::now();
    let mut db = loop {
        tokio::select! {
            _ = int.recv() => return Ok((Waited::Interrupted, None)),
            _ = term.recv() => return Ok((Waited::Interrupted, None)),
            st = daemon.wait() => {
                let st = st.context("waiting for the gateway")?;
                complain!("pecgate demo: the gateway exited at start ({st}); its log:\n{}", tail(&log));
                return Ok((Waited::DaemonExited, None));
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let path = database.clone();
        let opened = tokio::task::spawn_blocking(move || Db::open_read_only(&path)).await?;
        if let Ok(db) = opened {
            break db;
        }
        if started.elapsed() > START_LIMIT {
            anyhow::bail!(
                "the gateway did not create {} within {} s; its log:\n{}",
                database.display(),
                START_LIMIT.as_secs(),
                tail(&log)
            );
        }
    };

    let plan = plan(tag);
    let outbox = dir.join("outbox");
    say!("  dropping the sample letters into {}:", outbox.display());
    say!(
        "    certificato    a residence certificate (PDF) to {}",
        address::MARIO
    );
    say!(
        "    raccomandata   a registered letter to {}, cc {} (ordinary)",
        address::GIULIA,
        address::PAOLO
    );
    say!(
        "    sconosciuto    a letter to {} (no such mailbox)",
        address::NOBODY
    );
    for r in &plan.rejections {
        say!(
            "    {:<14} a letter that will be refused: {}",
            r.label,
            r.why
        );
    }
    say!(
        "    tari           a mass mailing: {}.csv (3 rows) + template",
        format_args!("demo-{tag}-tari")
    );
    {
        let (outbox, plan) = (outbox.clone(), plan.clone());
        tokio::task::spawn_blocking(move || {
            drop_files(&outbox, &plan, crate::outbound::system_now())
        })
        .await??;
    }
    let dropped = Instant::now();
    let deadline = dropped + opts.timeout;
    say!(
        "progress (read from the store every {} ms):",
        POLL.as_millis()
    );

    let mut seen = HashMap::new();
    let mut last: Option<Observation> = None;
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let waited = loop {
        tokio::select! {
            _ = int.recv() => break Waited::Interrupted,
            _ = term.recv() => break Waited::Interrupted,
            st = daemon.wait() => {
                let st = st.context("waiting for the gateway")?;
                complain!("pecgate demo: the gateway exited ({st}); its log:\n{}", tail(&log));
                break Waited::DaemonExited;
            }
            _ = ticker.tick() => {}
        }
        let (back, obs) = {
            let (outbox, plan) = (outbox.clone(), plan.clone());
            tokio::task::spawn_blocking(move || {
                let obs = observe(&db, &outbox, &plan);
                (db, obs)
            })
            .await?
        };
        db = back;
        let obs = obs?;
        for line in progress_lines(&mut seen, &obs, dropped.elapsed()) {
            say!("{line}");
        }
        let done = obs.is_done();
        let settled = obs.is_settled();
        last = Some(obs);
        if done {
            break Waited::Done;
        }
        if settled {
            break Waited::Settled;
        }
        if Instant::now() >= deadline {
            break Waited::TimedOut;
        }
    };

    if let Some(obs) = &last {
        say!();
        say_raw!("{}", render_table(obs, dir));
        say!();
    }
    match &waited {
        Waited::Done => say!(
            "every letter is final ({:.1} s after they were dropped).",
            dropped.elapsed().as_secs_f64()
        ),
        Waited::Settled | Waited::TimedOut => {
            let why = if matches!(waited, Waited::TimedOut) {
                format!("not final after {:.1} s", opts.timeout.as_secs_f64())
            } else {
                "refused by pecgate although valid".to_owned()
            };
            complain!("pecgate demo: some letters are {why}:");
            for l in last
                .as_ref()
                .map(Observation::not_final)
                .unwrap_or_default()
            {
                complain!("  {l}");
            }
        }
        Waited::Interrupted => say!("interrupted: stopping."),
        Waited::DaemonExited => {}
    }
    if matches!(waited, Waited::Done) && !opts.exit_when_done {
        say!(
            "Look around while everything keeps running:\n  \
             pecgate --config {cfg} list\n  \
             pecgate --config {cfg} show <dispatch_id>\n  \
             pecgate --config {cfg} status\n  \
             the letters and receipts: {sent}/   the refused letter: {rej}/\n\
             Stop with Ctrl-C.",
            cfg = dir.join("pecgate.toml").display(),
            sent = dir.join("sent").display(),
            rej = outbox.join(crate::outbox::intake::REJECTED_DIR).display(),
        );
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            st = daemon.wait() => {
                let st = st.context("waiting for the gateway")?;
                complain!("pecgate demo: the gateway exited ({st}); its log:\n{}", tail(&log));
                return Ok((Waited::DaemonExited, last));
            }
        }
        return Ok((Waited::Interrupted, last));
    }
    Ok((waited, last))
}

/// Spawns `pecgate --config CONFIG --log-format json run` (this executable),
/// its output appended to `log`, in its own process group (so that Ctrl-C
/// in the terminal reaches only the demo, which then stops it with SIGTERM).
fn spawn_daemon(config: &Path, log: &Path) -> anyhow::Result<tokio::process::Child> {
    let mut exe = std::env::current_exe().context("finding the pecgate executable")?;
    // Rebuilt (replaced) while the demo runs: the running image is still
    // reachable on Linux.
    let running = Path::new("/proc/self/exe");
    if !exe.is_file() && running.exists() {
        exe = running.to_path_buf();
    }
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg("--config")
        .arg(config)
        .arg("--log-format")
        .arg("json")
        .arg("run");
    // The sandbox's configuration as written: no override from the caller's
    // environment, no systemd notification socket.
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("PECGATE") || name == "NOTIFY_SOCKET" || name == "WATCHDOG_USEC" {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("starting {} run", exe.display()))
}

/// SIGTERM to the daemon (unless it has exited), then waits up to
/// [`STOP_LIMIT`] for it; after that, or on a second Ctrl-C, kills it.
async fn stop_daemon(
    daemon: &mut tokio::process::Child,
    int: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    if let Some(st) = daemon.try_wait()? {
        return Ok(Some(st));
    }
    let Some(pid) = daemon.id() else {
        return Ok(None);
    };
    let sent = tokio::process::Command::new("kill")
        .args(["-s", "TERM", "--", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if !sent.is_ok_and(|s| s.success()) {
        daemon.kill().await.context("killing the gateway")?;
        return Ok(None);
    }
    tokio::select! {
        st = daemon.wait() => Ok(Some(st.context("waiting for the gateway")?)),
        () = tokio::time::sleep(STOP_LIMIT) => {
            complain!("pecgate demo: the gateway did not stop within {} s: killing it", STOP_LIMIT.as_secs());
            daemon.kill().await.context("killing the gateway")?;
            Ok(None)
        }
        _ = int.recv() => {
            complain!("pecgate demo: second Ctrl-C: killing the gateway");
            daemon.kill().await.context("killing the gateway")?;
            Ok(None)
        }
    }
}

/// The last lines of the daemon's log (for an error message).
fn tail(log: &Path) -> String {
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("({}: {e})", log.display()),
    }
}

/// Reads the files of an outbox folder (used by the tests of this module).
#[cfg(test)]
fn names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::envelope::Envelope;

    #[test]
    fn the_plan_has_five_letters_and_every_envelope_parses() {
        let p = plan("20260102-030405");
        assert_eq!(p.letters.len(), 6, "3 single letters + 3 CSV rows");
        assert_eq!(p.rejections.len(), 1);
        for f in p.files.iter().filter(|f| f.name.ends_with(".toml")) {
            if let Err(problems) = Envelope::parse_bytes(&f.bytes) {
                panic!("{}: {problems:?}", f.name);
            }
            let text = String::from_utf8(f.bytes.clone()).unwrap();
            assert!(
                text.contains("20260102-030405"),
                "{} carries the tag",
                f.name
            );
        }
        let csv = p.files.iter().find(|f| f.name.ends_with(".csv")).unwrap();
        if let Err(problems) = crate::outbox::envelope::CsvTable::parse(&csv.bytes) {
            panic!("{}: {problems:?}", csv.name);
        }
        // Every file name carries the tag (a second run never collides).
        assert!(
            p.files
                .iter()
                .all(|f| f.name.starts_with("demo-20260102-030405-"))
        );
        // Envelopes come after the files they name.
        let pos = |n: &str| p.files.iter().position(|f| f.name.ends_with(n)).unwrap();
        assert!(pos("tari.toml") > pos("tari.csv"));
        assert!(pos("tari.csv") > pos("avviso-000125.pdf"));
        assert!(pos("certificato.toml") > pos("rossi.pdf"));
        // Only the refused letter is backdated, past the hour.
        let old: Vec<_> = p.files.iter().filter(|f| f.backdate.is_some()).collect();
        assert_eq!(old.len(), 1);
        assert!(old[0].name.ends_with("mancante.toml"));
        assert!(old[0].backdate.unwrap() > crate::outbox::intake::DEFAULT_MISSING_GRACE);
    }

    #[test]
    fn pdf_offsets_point_at_objects() {
        let pdf = pdf_document(&["Hello (world)", "àccent"]);
        // One byte per byte, so that offsets stay offsets.
        let text: String = pdf
            .iter()
            .map(|&b| if b.is_ascii() { b as char } else { '~' })
            .collect();
        let xref_at: usize = text
            .rsplit("startxref\n")
            .next()
            .and_then(|t| t.lines().next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(text[xref_at..].starts_with("xref"));
        for (i, line) in text[xref_at..].lines().skip(3).take(5).enumerate() {
            let off: usize = line[..10].parse().unwrap();
            assert!(
                text[off..].starts_with(&format!("{} 0 obj", i + 1)),
                "object {}",
                i + 1
            );
        }
        assert!(text.contains("(Hello \\(world\\)) Tj"));
        assert!(text.contains("(?ccent) Tj"));
    }

    #[test]
    fn drop_files_renames_and_backdates() {
        let tmp = tempfile::tempdir().unwrap();
        let p = plan("20260102-030405");
        let now = crate::outbound::system_now();
        drop_files(tmp.path(), &p, now).unwrap();
        let got = names(tmp.path()).unwrap();
        assert_eq!(got.len(), p.files.len(), "no temporary file left: {got:?}");
        let m = fs::metadata(tmp.path().join("demo-20260102-030405-mancante.toml"))
            .unwrap()
            .modified()
            .unwrap();
        assert!(now.duration_since(m).unwrap() >= BACKDATE - Duration::from_secs(1));
    }

    #[test]
    fn progress_shows_each_change_once() {
        let p = plan("t");
        let mut obs = Observation {
            letters: p
                .letters
                .iter()
                .map(|e| LetterStatus {
                    expected: e.clone(),
                    detail: None,
                    proofs: Vec::new(),
                    rejected: None,
                })
                .collect(),
            rejections: Vec::new(),
        };
        let mut seen = HashMap::new();
        assert!(progress_lines(&mut seen, &obs, Duration::ZERO).is_empty());
        obs.letters[0].rejected = Some(PathBuf::from("x.error.txt"));
        let lines = progress_lines(&mut seen, &obs, Duration::from_millis(1500));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("REFUSED"), "{lines:?}");
        assert!(progress_lines(&mut seen, &obs, Duration::from_secs(2)).is_empty());
        assert!(!obs.is_settled());
        assert!(!obs.is_done());
        assert_eq!(obs.not_final().len(), 6);
    }
}
