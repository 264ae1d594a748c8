//! The envelope `NAME.toml` and the CSV of a mass mailing: pure parsing and
//! placeholder expansion. No file system access; the caller passes bytes.
//!
//! An envelope mirrors the file exactly ([`Envelope`], every key optional so
//! that every missing key is reported together with the other problems by
//! [`super::validate`]). Parsing reports, in Italian and English:
//!
//! - text that is not UTF-8 (with the line), TOML syntax errors (with line
//!   and column);
//! - unknown keys (with the line and the closest known key: a typo must not
//!   pass);
//! - values of the wrong type (`protocol = 1234` instead of a quoted
//!   string).
//!
//! Placeholders: in every text value of an envelope, `{column}` stands for a
//! CSV column and `{{` / `}}` for a literal brace. A single letter (no CSV)
//! must not contain placeholders: one that does was most likely meant as a
//! mass-mailing template whose CSV is missing, and is refused rather than
//! sent with `{nome}` in it.
//!
//! CSV: UTF-8 (a BOM is tolerated), `;` or `,` chosen from the header row,
//! header names trimmed, cells trimmed, rows whose cells are all empty
//! skipped (spreadsheets export them). Rows are numbered like a spreadsheet
//! shows them: the header is row 1, the row number is the line of the file
//! where the row starts.

use std::collections::BTreeSet;

use config::{Format, Value, ValueKind};
use serde::Deserialize;

use super::Problem;

/// Every key an envelope may contain (other programs write them: the names
/// are an interface).
pub const KEYS: &[&str] = &[
    "to",
    "cc",
    "subject",
    "body",
    "body_file",
    "attachments",
    "kind",
    "protocol",
    "reference",
    "receipt",
    "in_reply_to",
    "allow_duplicate",
];

/// Keys whose value is a list of texts (a single text is accepted too).
const LIST_KEYS: &[&str] = &["to", "cc", "attachments"];
/// Keys whose value is true or false.
const BOOL_KEYS: &[&str] = &["allow_duplicate"];

/// An envelope file is at most this big (it names files; documents travel
/// beside it).
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// A mass-mailing CSV is at most this big.
pub const MAX_CSV_BYTES: usize = 20 * 1024 * 1024;

/// The CSV column with each row's recipient.
pub const COLUMN_TO: &str = "to";
/// The optional CSV column naming a per-row document.
pub const COLUMN_ATTACHMENT: &str = "attachment";

/// The envelope `NAME.toml` as written (see `docs/outbox.md` for each key).
/// Nothing here is validated beyond its type: [`super::validate`] does that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// PEC addresses of the primary recipients (required).
    pub to: Option<Vec<String>>,
    /// Carbon-copy recipients.
    pub cc: Option<Vec<String>>,
    /// The subject (required).
    pub subject: Option<String>,
    /// The text of the letter (or `body_file`).
    pub body: Option<String>,
    /// A UTF-8 text file in the outbox folder holding the text.
    pub body_file: Option<String>,
    /// File names of the documents, in the outbox folder.
    pub attachments: Option<Vec<String>>,
    /// `certificato`, `raccomandata`, `avviso`, `tributi` or `altro`.
    pub kind: Option<String>,
    /// The protocol number.
    pub protocol: Option<String>,
    /// An external reference (the caller's own id).
    pub reference: Option<String>,
    /// `completa`, `breve` or `sintetica`.
    pub receipt: Option<String>,
    /// The identificativo of the incoming certified message this answers.
    pub in_reply_to: Option<String>,
    /// Send even if an identical letter was already sent.
    pub allow_duplicate: Option<bool>,
}

impl Envelope {
    /// Parses an envelope file's bytes: UTF-8 (a BOM is tolerated), then
    /// [`Envelope::parse`].
    ///
    /// # Errors
    ///
    /// Every problem found, each naming its line or key.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Envelope, Vec<Problem>> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(vec![Problem::new(
                "envelope",
                format!(
                    "la busta è troppo grande ({} byte, al massimo {MAX_ENVELOPE_BYTES}): i documenti vanno in file a parte, elencati in attachments",
                    bytes.len()
                ),
                format!(
                    "the envelope is too big ({} bytes, at most {MAX_ENVELOPE_BYTES}): documents go in separate files listed in attachments",
                    bytes.len()
                ),
            )]);
        }
        let text = utf8_text(bytes, "envelope")?;
        Envelope::parse(text)
    }

    /// Parses the TOML text of an envelope.
    ///
    /// # Errors
    ///
    /// Every problem found: a syntax error (one, with its line and column),
    /// or every unknown key and every value of the wrong type.
    pub fn parse(text: &str) -> Result<Envelope, Vec<Problem>> {
        match Envelope::parse_inner(text) {
            (Some(e), p) if p.is_empty() => Ok(e),
            (_, p) => Err(p),
        }
    }

    /// The envelope as far as it can be read: every known key with a value
    /// of the right type (for finding the files a letter names even when
    /// other keys are wrong); `None` when the bytes are not UTF-8 TOML.
    pub fn parse_lenient(bytes: &[u8]) -> Option<Envelope> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return None;
        }
        let text = utf8_text(bytes, "envelope").ok()?;
        Envelope::parse_inner(text).0
    }

    fn parse_inner(text: &str) -> (Option<Envelope>, Vec<Problem>) {
        let table = match config::FileFormat::Toml.parse(None, text) {
            Ok(t) => t,
            Err(e) => return (None, vec![toml_syntax_problem(&e.to_string())]),
        };
        let mut problems = Vec::new();
        let mut json = serde_json::Map::new();
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort_by_key(|k| (key_line(text, k).unwrap_or(usize::MAX), k.as_str()));
        for key in keys {
            let value = &table[key];
            let at = match key_line(text, key) {
                Some(n) => (format!(" (riga {n})"), format!(" (line {n})")),
                None => (String::new(), String::new()),
            };
            if !KEYS.contains(&key.as_str()) {
                problems.push(unknown_key(key, &at));
                continue;
            }
            match typed_value(key, value, &at) {
                Ok(v) => {
                    json.insert(key.clone(), v);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        // The types were checked above; serde is the single description of
        // the shape (and refuses anything the checks above missed).
        match serde_path_to_error::deserialize(serde_json::Value::Object(json)) {
            Ok(e) => (Some(e), problems),
            Err(e) => {
                let field = e.path().to_string();
                let msg = e.inner().to_string();
                problems.push(Problem::new(
                    field,
                    format!("valore non valido: {msg}"),
                    format!("invalid value: {msg}"),
                ));
                (None, problems)
            }
        }
    }

    /// The file names this envelope mentions (`body_file`, then
    /// `attachments`), as written.
    pub fn named_files(&self) -> Vec<&str> {
        self.body_file
            .iter()
            .chain(self.attachments.iter().flatten())
            .map(String::as_str)
            .collect()
    }

    /// Every text value with its field name (`subject`, `to[0]`, ...), in a
    /// fixed order.
    pub fn texts(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        let Envelope {
            to,
            cc,
            subject,
            body,
            body_file,
            attachments,
            kind,
            protocol,
            reference,
            receipt,
            in_reply_to,
            allow_duplicate: _,
        } = self;
        for (name, list) in [("to", to), ("cc", cc)] {
            for (i, s) in list.iter().flatten().enumerate() {
                out.push((format!("{name}[{i}]"), s.as_str()));
            }
        }
        for (name, v) in [
            ("subject", subject),
            ("body", body),
            ("body_file", body_file),
        ] {
            if let Some(s) = v {
                out.push((name.to_owned(), s.as_str()));
            }
        }
        for (i, s) in attachments.iter().flatten().enumerate() {
            out.push((format!("attachments[{i}]"), s.as_str()));
        }
        for (name, v) in [
            ("kind", kind),
            ("protocol", protocol),
            ("reference", reference),
            ("receipt", receipt),
            ("in_reply_to", in_reply_to),
        ] {
            if let Some(s) = v {
                out.push((name.to_owned(), s.as_str()));
            }
        }
        out
    }

    fn texts_mut(&mut self) -> Vec<&mut String> {
        let Envelope {
            to,
            cc,
            subject,
            body,
            body_file,
            attachments,
            kind,
            protocol,
            reference,
            receipt,
            in_reply_to,
            allow_duplicate: _,
        } = self;
        let mut out: Vec<&mut String> = Vec::new();
        out.extend(to.iter_mut().flatten());
        out.extend(cc.iter_mut().flatten());
        out.extend([subject, body, body_file].into_iter().flatten());
        out.extend(attachments.iter_mut().flatten());
        out.extend(
            [kind, protocol, reference, receipt, in_reply_to]
                .into_iter()
                .flatten(),
        );
        out
    }

    /// Checks the placeholders of every text value: against the CSV's
    /// `columns` for a mass mailing, or (`columns` = `None`) that a single
    /// letter has none. `csv_name` names the CSV in messages (for a single
    /// letter: the CSV that would make it a mass mailing).
    pub fn check_placeholders(&self, columns: Option<&[String]>, csv_name: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (field, text) in self.texts() {
            let pieces = match pieces(text) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(Problem::new(field, e.0, e.1));
                    continue;
                }
            };
            let mut seen = BTreeSet::new();
            for piece in pieces {
                let Piece::Column(c) = piece else { continue };
                if !seen.insert(c.clone()) {
                    continue;
                }
                match columns {
                    None => problems.push(Problem::new(
                        field.clone(),
                        format!(
                            "il testo contiene il segnaposto {{{c}}}, ma accanto alla busta non c'è il file {csv_name}: per una spedizione massiva copiare nella cartella anche {csv_name}; per scrivere una parentesi graffa usare {{{{ e }}}}"
                        ),
                        format!(
                            "the text contains the placeholder {{{c}}}, but there is no {csv_name} next to the envelope: for a mass mailing copy {csv_name} into the folder too; to write a brace use {{{{ and }}}}"
                        ),
                    )),
                    Some(cols) if !cols.iter().any(|x| x == &c) => {
                        let list = cols
                            .iter()
                            .filter(|x| !x.is_empty())
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ");
                        problems.push(Problem::new(
                            field.clone(),
                            format!(
                                "il segnaposto {{{c}}} non corrisponde a nessuna colonna di {csv_name} (colonne: {list}): correggere il nome tra graffe (maiuscole comprese) o aggiungere la colonna"
                            ),
                            format!(
                                "the placeholder {{{c}}} names no column of {csv_name} (columns: {list}): fix the name between braces (case matters) or add the column"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        problems
    }

    /// The envelope with every placeholder replaced by `lookup(column)` and
    /// `{{` / `}}` turned into braces. Call [`Envelope::check_placeholders`]
    /// first: a syntax error is left as written here.
    ///
    /// # Errors
    ///
    /// The columns (each once, in order of use) whose value `lookup` gave
    /// as `None` or empty.
    pub fn expand(&self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Envelope, Vec<String>> {
        let mut out = self.clone();
        let mut empty: Vec<String> = Vec::new();
        for text in out.texts_mut() {
            let Ok(ps) = pieces(text) else { continue };
            let mut s = String::with_capacity(text.len());
            for p in ps {
                match p {
                    Piece::Text(t) => s.push_str(&t),
                    Piece::Column(c) => match lookup(&c) {
                        Some(v) if !v.trim().is_empty() => s.push_str(&v),
                        _ => {
                            if !empty.contains(&c) {
                                empty.push(c);
                            }
                        }
                    },
                }
            }
            *text = s;
        }
        if empty.is_empty() {
            Ok(out)
        } else {
            Err(empty)
        }
    }
}

// ---------------------------------------------------------------------------
// Placeholders

/// One text with its placeholders replaced (`{{` / `}}` unescaped); `None`
/// when it has a syntax error or a placeholder whose value is missing or
/// empty.
pub fn expand_text(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    for p in pieces(s).ok()? {
        match p {
            Piece::Text(t) => out.push_str(&t),
            Piece::Column(c) => {
                let v = lookup(&c).filter(|v| !v.trim().is_empty())?;
                out.push_str(&v);
            }
        }
    }
    Some(out)
}

/// The file names a letter (or, with its CSV, a batch) names, found as
/// leniently as possible: every name that can be worked out, even when the
/// envelope or some rows are wrong, so that a refused letter takes its
/// documents with it. Names are as written (not checked).
pub fn named_files_lenient(envelope: &Envelope, csv: Option<&CsvTable>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |n: String| {
        if !out.contains(&n) {
            out.push(n);
        }
    };
    let none = |_: &str| None;
    for name in envelope.named_files() {
        match csv {
            None => {
                if let Some(n) = expand_text(name, &none) {
                    add(n);
                }
            }
            Some(t) => {
                for row in &t.rows {
                    let lookup = |c: &str| t.column(c).map(|i| row.cells[i].clone());
                    if let Some(n) = expand_text(name, &lookup) {
                        add(n);
                    }
                }
            }
        }
    }
    if let Some(t) = csv
        && let Some(i) = t.column(COLUMN_ATTACHMENT)
    {
        for row in &t.rows {
            if !row.cells[i].is_empty() {
                add(row.cells[i].clone());
            }
        }
    }
    out
}

/// A piece of a text value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Column(String),
}

/// Splits a text into literal pieces and `{column}` placeholders.
fn pieces(s: &str) -> Result<Vec<Piece>, (String, String)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let rest = &s[i + 1..];
                let Some(end) = rest
                    .find(['}', '{'])
                    .filter(|&e| rest.as_bytes()[e] == b'}')
                else {
                    let shown: String = s[i..].chars().take(30).collect();
                    return Err((
                        format!(
                            "la parentesi graffa in \"{shown}\" non è chiusa: un segnaposto si scrive {{colonna}}; per una graffa letterale scrivere {{{{"
                        ),
                        format!(
                            "the brace in \"{shown}\" is not closed: a placeholder is written {{column}}; for a literal brace write {{{{"
                        ),
                    ));
                };
                let name = rest[..end].trim();
                if name.is_empty() {
                    return Err((
                        "segnaposto vuoto {}: scrivere il nome di una colonna tra le graffe, o {{ e }} per le graffe letterali".to_owned(),
                        "empty placeholder {}: write a column name between the braces, or {{ and }} for literal braces".to_owned(),
                    ));
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Column(name.to_owned()));
                // Skip the name and the closing brace.
                let stop = i + 1 + end;
                while chars.peek().is_some_and(|&(j, _)| j <= stop) {
                    chars.next();
                }
            }
            // A lone closing brace is taken literally.
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// TOML helpers

fn toml_syntax_problem(message: &str) -> Problem {
    // toml's message: "TOML parse error at line L, column C\n  |\n...\n  | ^\nwhat"
    let first = message.lines().next().unwrap_or_default();
    let position = first
        .strip_prefix("TOML parse error at ")
        .map(str::to_owned);
    let detail: Vec<&str> = message
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with('|') && !l.contains(" | ") && !l.trim().is_empty())
        .collect();
    let detail = if detail.is_empty() {
        first.to_owned()
    } else {
        detail.join("; ")
    };
    let (line, col) = position
        .as_deref()
        .and_then(|p| {
            let p = p.strip_prefix("line ")?;
            let (l, c) = p.split_once(", column ")?;
            Some((l.trim().to_owned(), c.trim().to_owned()))
        })
        .unwrap_or_default();
    let (field, it_at, en_at) = if line.is_empty() {
        ("envelope".to_owned(), String::new(), String::new())
    } else {
        (
            format!("line {line}"),
            format!(" alla riga {line}, colonna {col}"),
            format!(" at line {line}, column {col}"),
        )
    };
    Problem::new(
        field,
        format!(
            "la busta non è un file TOML valido{it_at} ({detail}): controllare virgolette, parentesi quadre, virgole tra gli elementi e il segno = (es. subject = \"Oggetto\")"
        ),
        format!(
            "the envelope is not valid TOML{en_at} ({detail}): check quotes, square brackets, commas between items and the = sign (e.g. subject = \"Subject\")"
        ),
    )
}

/// The line (1-based) where `key` is set at the start of a line (`key =`,
/// `"key" =`, `[key]`), if any.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix('[') {
                let inner = rest.trim_start_matches('[').trim_start();
                return inner
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(']'));
            }
            let rest = t
                .strip_prefix(key)
                .or_else(|| t.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| t.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|r| r.trim_start().starts_with('=') || r.starts_with('.'))
        })
        .map(|i| i + 1)
}

fn unknown_key(key: &str, at: &(String, String)) -> Problem {
    let (it_hint, en_hint) = match closest_key(key) {
        Some(k) => (
            format!(" (forse \"{k}\"?)"),
            format!(" (did you mean \"{k}\"?)"),
        ),
        None => (String::new(), String::new()),
    };
    let list = KEYS.join(", ");
    Problem::new(
        key,
        format!(
            "chiave sconosciuta \"{key}\"{}{it_hint}: le chiavi ammesse sono {list}; correggere o togliere la riga",
            at.0
        ),
        format!(
            "unknown key \"{key}\"{}{en_hint}: the keys allowed are {list}; fix or remove the line",
            at.1
        ),
    )
}

/// The known key nearest to a misspelt one (edit distance at most 3, or
/// the same letters in another case).
fn closest_key(key: &str) -> Option<&'static str> {
    let lower = key.to_lowercase();
    KEYS.iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .filter(|(d, _)| *d <= 3.min(key.chars().count().max(1)))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What a TOML value is, for messages.
fn describe(kind: &ValueKind) -> (&'static str, &'static str) {
    match kind {
        ValueKind::Nil => ("un valore vuoto", "an empty value"),
        ValueKind::Boolean(_) => ("true/false", "true/false"),
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            ("un numero senza virgolette", "an unquoted number")
        }
        ValueKind::Float(_) => ("un numero senza virgolette", "an unquoted number"),
        ValueKind::String(_) => ("un testo", "a text"),
        ValueKind::Table(_) => ("una tabella", "a table"),
        ValueKind::Array(_) => ("un elenco", "a list"),
    }
}

/// Checks the type of one known key's value and converts it for serde.
fn typed_value(
    key: &str,
    value: &Value,
    at: &(String, String),
) -> Result<serde_json::Value, Vec<Problem>> {
    if BOOL_KEYS.contains(&key) {
        return match value.kind {
            ValueKind::Boolean(b) => Ok(serde_json::Value::Bool(b)),
            ref other => {
                let (it, en) = describe(other);
                Err(vec![Problem::new(
                    key,
                    format!(
                        "\"{key}\"{} deve essere true oppure false, senza virgolette (es. {key} = true), non {it}",
                        at.0
                    ),
                    format!(
                        "\"{key}\"{} must be true or false, without quotes (e.g. {key} = true), not {en}",
                        at.1
                    ),
                )])
            }
        };
    }
    if LIST_KEYS.contains(&key) {
        return match &value.kind {
            // A single text is accepted for a list of one.
            ValueKind::String(s) => Ok(serde_json::Value::Array(vec![serde_json::Value::String(
                s.clone(),
            )])),
            ValueKind::Array(items) => {
                let mut out = Vec::new();
                let mut problems = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match &item.kind {
                        ValueKind::String(s) => out.push(serde_json::Value::String(s.clone())),
                        other => {
                            let (it, en) = describe(other);
                            problems.push(Problem::new(
                                format!("{key}[{i}]"),
                                format!(
                                    "l'elemento {} di \"{key}\"{} deve essere un testo tra virgolette, non {it}",
                                    i + 1,
                                    at.0
                                ),
                                format!(
                                    "item {} of \"{key}\"{} must be a quoted text, not {en}",
                                    i + 1,
                                    at.1
                                ),
                            ));
                        }
                    }
                }
                if problems.is_empty() {
                    Ok(serde_json::Value::Array(out))
                } else {
                    Err(problems)
                }
            }
            other => {
                let (it, en) = describe(other);
                Err(vec![Problem::new(
                    key,
                    format!(
                        "\"{key}\"{} deve essere un elenco di testi tra virgolette (es. {key} = [\"primo\", \"secondo\"]), non {it}",
                        at.0
                    ),
                    format!(
                        "\"{key}\"{} must be a list of quoted texts (e.g. {key} = [\"first\", \"second\"]), not {en}",
                        at.1
                    ),
                )])
            }
        };
    }
    match &value.kind {
        ValueKind::String(s) => Ok(serde_json::Value::String(s.clone())),
        other => {
            let (it, en) = describe(other);
            Err(vec![Problem::new(
                key,
                format!(
                    "\"{key}\"{} deve essere un testo tra virgolette (es. {key} = \"...\"), non {it}",
                    at.0
                ),
                format!(
                    "\"{key}\"{} must be a quoted text (e.g. {key} = \"...\"), not {en}",
                    at.1
                ),
            )])
        }
    }
}

/// The text of a UTF-8 file (a BOM is dropped), or a problem naming the
/// first bad line.
pub(crate) fn utf8_text<'a>(bytes: &'a [u8], field: &str) -> Result<&'a str, Vec<Problem>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Err(vec![Problem::new(
            field,
            "il file è in UTF-16 (\"Unicode\"): salvarlo di nuovo scegliendo la codifica UTF-8",
            "the file is UTF-16 (\"Unicode\"): save it again choosing the UTF-8 encoding",
        )]);
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        vec![Problem::new(
            format!("{field}, line {line}"),
            format!(
                "il file non è in UTF-8 (riga {line}; forse è stato salvato come ANSI/Windows-1252): salvarlo di nuovo scegliendo la codifica UTF-8"
            ),
            format!(
                "the file is not UTF-8 (line {line}; perhaps it was saved as ANSI/Windows-1252): save it again choosing the UTF-8 encoding"
            ),
        )]
    })
}

// ---------------------------------------------------------------------------
// CSV

/// The CSV of a mass mailing, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvTable {
    /// The separator found in the header row (`;` or `,`).
    pub delimiter: u8,
    /// The header names, trimmed (an empty name is a column nobody uses).
    pub columns: Vec<String>,
    /// The data rows (rows with every cell empty are skipped).
    pub rows: Vec<CsvRow>,
}

/// One data row of a CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRow {
    /// The row number a spreadsheet shows (the header is row 1): the line of
    /// the file where the row starts.
    pub number: u64,
    /// The cells, trimmed, one per column (missing trailing cells are
    /// empty).
    pub cells: Vec<String>,
}

impl CsvTable {
    /// Parses a CSV file's bytes.
    ///
    /// # Errors
    ///
    /// Every problem found (encoding, header, rows with too many values),
    /// each naming the row and column.
    pub fn parse(bytes: &[u8]) -> Result<CsvTable, Vec<Problem>> {
        match CsvTable::parse_inner(bytes) {
            (Some(t), p) if p.is_empty() => Ok(t),
            (_, p) => Err(p),
        }
    }

    /// The table as far as it can be read (for finding the files a batch
    /// names even when some rows are wrong), `None` when the text cannot be
    /// read at all.
    pub fn parse_lenient(bytes: &[u8]) -> Option<CsvTable> {
        CsvTable::parse_inner(bytes).0
    }

    fn parse_inner(bytes: &[u8]) -> (Option<CsvTable>, Vec<Problem>) {
        if bytes.len() > MAX_CSV_BYTES {
            return (
                None,
                vec![Problem::new(
                    "csv",
                    format!(
                        "il file CSV è troppo grande ({} byte, al massimo {MAX_CSV_BYTES}): dividerlo in più spedizioni",
                        bytes.len()
                    ),
                    format!(
                        "the CSV file is too big ({} bytes, at most {MAX_CSV_BYTES}): split it into several mailings",
                        bytes.len()
                    ),
                )],
            );
        }
        let text = match utf8_text(bytes, "csv") {
            Ok(t) => t,
            Err(p) => return (None, p),
        };
        let delimiter = detect_delimiter(text);
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_bytes());
        let mut problems = Vec::new();
        let mut columns: Option<Vec<String>> = None;
        let mut rows = Vec::new();
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let line = e.position().map(|p| line_at(text, p.byte())).unwrap_or(0);
                    let msg = e.to_string();
                    problems.push(Problem::new(
                        format!("csv row {line}"),
                        format!("riga {line} del CSV illeggibile ({msg})"),
                        format!("CSV row {line} cannot be read ({msg})"),
                    ));
                    break;
                }
            }
            // The line where the row starts (csv's own line count skips blank
            // lines, which a spreadsheet shows as rows).
            let number = record
                .position()
                .map(|p| line_at(text, p.byte()))
                .unwrap_or(0);
            let cells: Vec<String> = record.iter().map(|c| c.trim().to_owned()).collect();
            let Some(cols) = &columns else {
                columns = Some(cells);
                continue;
            };
            if cells.iter().all(String::is_empty) {
                continue;
            }
            let mut cells = cells;
            if cells.len() > cols.len() {
                let extra = cells[cols.len()..].iter().filter(|c| !c.is_empty()).count();
                if extra > 0 {
                    problems.push(Problem::new(
                        format!("csv row {number}"),
                        format!(
                            "la riga {number} ha {} valori ma l'intestazione ha {} colonne: togliere i valori in più o dare un nome alla colonna (se un testo contiene il separatore \"{}\", racchiuderlo tra virgolette)",
                            cells.len(),
                            cols.len(),
                            delimiter as char
                        ),
                        format!(
                            "row {number} has {} values but the header has {} columns: remove the extra values or name the column (a text that contains the separator \"{}\" must be quoted)",
                            cells.len(),
                            cols.len(),
                            delimiter as char
                        ),
                    ));
                }
                cells.truncate(cols.len());
            }
            for (i, c) in cells.iter().enumerate() {
                if cols[i].is_empty() && !c.is_empty() {
                    problems.push(Problem::new(
                        format!("csv row {number}, column {}", i + 1),
                        format!(
                            "la riga {number} ha un valore nella colonna {} che non ha nome nell'intestazione: dare un nome alla colonna o svuotare la cella",
                            i + 1
                        ),
                        format!(
                            "row {number} has a value in column {}, which has no name in the header: name the column or empty the cell",
                            i + 1
                        ),
                    ));
                }
            }
            cells.resize(cols.len(), String::new());
            rows.push(CsvRow { number, cells });
        }
        let Some(columns) = columns else {
            return (
                None,
                vec![Problem::new(
                    "csv",
                    "il file CSV è vuoto: la prima riga deve contenere i nomi delle colonne (almeno \"to\"), poi una riga per lettera",
                    "the CSV file is empty: the first row must hold the column names (at least \"to\"), then one row per letter",
                )],
            );
        };
        problems.splice(0..0, header_problems(&columns));
        if rows.is_empty() && problems.is_empty() {
            problems.push(Problem::new(
                "csv",
                "il file CSV non ha righe di dati: aggiungere una riga per lettera sotto l'intestazione",
                "the CSV file has no data rows: add one row per letter below the header",
            ));
        }
        let table = CsvTable {
            delimiter,
            columns,
            rows,
        };
        (Some(table), problems)
    }

    /// The index of a column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// The 1-based line where a record starting at a byte offset begins (csv
/// puts the offset before the blank lines it skips).
fn line_at(text: &str, byte: u64) -> u64 {
    let b = text.as_bytes();
    let mut end = usize::try_from(byte).unwrap_or(usize::MAX).min(b.len());
    while end < b.len() && matches!(b[end], b'\n' | b'\r') {
        end += 1;
    }
    b[..end].iter().filter(|&&c| c == b'\n').count() as u64 + 1
}

fn header_problems(columns: &[String]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for c in columns.iter().filter(|c| !c.is_empty()) {
        if !seen.insert(c.as_str()) {
            problems.push(Problem::new(
                format!("csv row 1, column {c}"),
                format!("la colonna \"{c}\" compare due volte nell'intestazione: rinominarne una"),
                format!("the column \"{c}\" appears twice in the header: rename one of them"),
            ));
        }
    }
    if !columns.iter().any(|c| c == COLUMN_TO) {
        let near = columns
            .iter()
            .find(|c| c.eq_ignore_ascii_case(COLUMN_TO))
            .map(|c| {
                (
                    format!(" (c'è \"{c}\": scriverlo tutto minuscolo)"),
                    format!(" (there is \"{c}\": write it in lower case)"),
                )
            })
            .unwrap_or_default();
        problems.push(Problem::new(
            "csv row 1, column to",
            format!(
                "manca la colonna \"to\" con l'indirizzo PEC del destinatario di ogni riga{}: la prima riga deve contenere i nomi delle colonne, ad esempio to;nome;attachment",
                near.0
            ),
            format!(
                "the column \"to\" with each row's recipient PEC address is missing{}: the first row must hold the column names, for example to;nome;attachment",
                near.1
            ),
        ));
    }
    if let Some(c) = columns
        .iter()
        .find(|c| c.as_str() != COLUMN_ATTACHMENT && c.eq_ignore_ascii_case(COLUMN_ATTACHMENT))
    {
        problems.push(Problem::new(
            format!("csv row 1, column {c}"),
            format!("la colonna \"{c}\" va scritta \"attachment\", tutto minuscolo"),
            format!("the column \"{c}\" must be written \"attachment\", in lower case"),
        ));
    }
    problems
}

/// `;` or `,`, whichever the header row (outside quotes) has more of; `;`
/// on a tie (the Italian spreadsheet default), `,` when it has neither.
fn detect_delimiter(text: &str) -> u8 {
    let (mut semi, mut comma, mut quoted) = (0usize, 0usize, false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '\n' if !quoted => break,
            ';' if !quoted => semi += 1,
            ',' if !quoted => comma += 1,
            _ => {}
        }
    }
    if semi > 0 && semi >= comma {
        b';'
    } else {
        b','
    }
}

/// The CSV column a field of an expanded row comes from, when the
/// template's value is that column alone (`to = ["{pec}"]`, the implied
/// `{to}`, the `attachment` column's document): problems then name the
/// cell the clerk must fix (`csv row 12, column to`).
pub fn column_of_field(template: &Envelope, table: &CsvTable, field: &str) -> Option<String> {
    if field == "to[0]" && template.to.is_none() {
        return Some(COLUMN_TO.to_owned());
    }
    let listed = template.attachments.as_ref().map_or(0, Vec::len);
    if table.column(COLUMN_ATTACHMENT).is_some() && field == format!("attachments[{listed}]") {
        return Some(COLUMN_ATTACHMENT.to_owned());
    }
    let (_, text) = template.texts().into_iter().find(|(f, _)| f == field)?;
    match pieces(text).ok()?.as_slice() {
        [Piece::Column(c)] => Some(c.clone()),
        _ => None,
    }
}

/// Whether a field of the template is the same on every row (a text
/// without placeholders): its problems are the template's, said once.
pub fn is_literal_field(template: &Envelope, field: &str) -> bool {
    template
        .texts()
        .into_iter()
        .find(|(f, _)| f == field)
        .and_then(|(_, text)| pieces(text).ok())
        .is_some_and(|ps| ps.iter().all(|p| matches!(p, Piece::Text(_))))
}

/// One letter of a mass mailing: a row's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowEnvelope {
    /// The spreadsheet row number.
    pub row: u64,
    /// The letter's name, `NAME.csv#<row>`.
    pub name: String,
    /// The template with the row's values in place.
    pub envelope: Envelope,
}

/// Expands a template over every row of a CSV. Without a `to` key, the
/// template's recipient is `{to}`; the row's `attachment` (if the column
/// exists) is added after the template's attachments unless already named.
///
/// # Errors
///
/// Every problem of the template's placeholders, and every empty cell used
/// by a row (`csv row 12, column nome`). One bad row refuses the batch.
pub fn expand_batch(
    template: &Envelope,
    table: &CsvTable,
    csv_name: &str,
) -> Result<Vec<RowEnvelope>, Vec<Problem>> {
    match expand_rows(template, table, csv_name) {
        (rows, p) if p.is_empty() => Ok(rows),
        (_, p) => Err(p),
    }
}

/// [`expand_batch`], keeping the rows that expanded (so that they can be
/// checked too and every problem reported at once) next to the problems.
/// A problem of the template's placeholders gives no rows.
pub fn expand_rows(
    template: &Envelope,
    table: &CsvTable,
    csv_name: &str,
) -> (Vec<RowEnvelope>, Vec<Problem>) {
    let mut template = template.clone();
    if template.to.is_none() {
        template.to = Some(vec![format!("{{{COLUMN_TO}}}")]);
    }
    let problems = template.check_placeholders(Some(&table.columns), csv_name);
    if !problems.is_empty() {
        return (Vec::new(), problems);
    }
    let attachment_col = table.column(COLUMN_ATTACHMENT);
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(table.rows.len());
    for row in &table.rows {
        let lookup = |c: &str| table.column(c).map(|i| row.cells[i].clone());
        let mut envelope = match template.expand(&lookup) {
            Ok(e) => e,
            Err(columns) => {
                for c in columns {
                    problems.push(Problem::new(
                        format!("csv row {}, column {c}", row.number),
                        format!(
                            "nella riga {} la cella della colonna \"{c}\" è vuota, ma il modello la usa ({{{c}}}): riempirla o togliere la riga",
                            row.number
                        ),
                        format!(
                            "in row {} the cell of column \"{c}\" is empty, but the template uses it ({{{c}}}): fill it in or remove the row",
                            row.number
                        ),
                    ));
                }
                continue;
            }
        };
        if let Some(i) = attachment_col {
            let doc = &row.cells[i];
            if doc.is_empty() {
                problems.push(Problem::new(
                    format!("csv row {}, column {COLUMN_ATTACHMENT}", row.number),
                    format!(
                        "nella riga {} la cella \"attachment\" è vuota: scrivere il nome del documento di quella riga (le righe senza documento vanno in una spedizione a parte, senza la colonna attachment)",
                        row.number
                    ),
                    format!(
                        "in row {} the \"attachment\" cell is empty: write the name of that row's document (rows without a document go in a separate mailing, without the attachment column)",
                        row.number
                    ),
                ));
                continue;
            }
            let list = envelope.attachments.get_or_insert_with(Vec::new);
            if !list.iter().any(|a| a == doc) {
                list.push(doc.clone());
            }
        }
        out.push(RowEnvelope {
            row: row.number,
            name: format!("{csv_name}#{}", row.number),
            envelope,
        });
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(p: &[Problem]) -> Vec<&str> {
        p.iter().map(|p| p.field.as_str()).collect()
    }

    #[test]
    fn a_complete_envelope_parses() {
        let e = Envelope::parse(
            r#"
to = ["mario.rossi@pec.example.it"]
cc = []
subject = "Certificato di residenza"
body = "Gentile signore"
attachments = ["certificato.pdf"]
kind = "certificato"
protocol = "2026/0001234"
reference = "pratica-77"
receipt = "completa"
in_reply_to = "opec1.2@pec.example.it"
allow_duplicate = false
"#,
        )
        .unwrap();
        assert_eq!(e.named_files(), ["certificato.pdf"]);
        assert_eq!(e.to.unwrap(), ["mario.rossi@pec.example.it"]);
        assert_eq!(e.cc.unwrap(), Vec::<String>::new());
        assert_eq!(e.allow_duplicate, Some(false));
    }

    #[test]
    fn a_single_text_is_a_list_of_one() {
        let e = Envelope::parse("to = \"a@b.it\"\nattachments = \"x.pdf\"").unwrap();
        assert_eq!(e.to.unwrap(), ["a@b.it"]);
        assert_eq!(e.attachments.unwrap(), ["x.pdf"]);
    }

    #[test]
    fn unknown_keys_are_named_with_line_and_suggestion() {
        let p = Envelope::parse("to = [\"a@b.it\"]\nsubjet = \"x\"\n[extra]\nk = 1\n").unwrap_err();
        assert_eq!(fields(&p), ["subjet", "extra"]);
        assert!(p[0].en.contains("line 2"), "{}", p[0].en);
        assert!(p[0].en.contains("did you mean \"subject\""));
        assert!(p[0].it.contains("forse \"subject\""));
        assert!(p[1].en.contains("line 3"));
    }

    #[test]
    fn wrong_types_are_named() {
        let p = Envelope::parse(
            "to = [\"a@b.it\", 3]\nprotocol = 1234\nallow_duplicate = \"yes\"\ncc = 1",
        )
        .unwrap_err();
        assert_eq!(fields(&p), ["to[1]", "protocol", "allow_duplicate", "cc"]);
        assert!(p[1].en.contains("quoted text"));
        assert!(p[2].en.contains("true or false"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let p = Envelope::parse("to = [\"a@b.it\"\nsubject = \"x\"").unwrap_err();
        assert_eq!(fields(&p), ["line 2"]);
        assert!(p[0].it.contains("riga 2, colonna 1"), "{}", p[0].it);
        let p = Envelope::parse("subject = \"x\"\nsubject = \"y\"").unwrap_err();
        assert!(p[0].en.contains("duplicate key"), "{}", p[0].en);
    }

    #[test]
    fn non_utf8_names_the_line() {
        let p = Envelope::parse_bytes(b"to = [\"a@b.it\"]\nsubject = \"caf\xe8\"").unwrap_err();
        assert_eq!(p[0].field, "envelope, line 2");
        let ok = Envelope::parse_bytes(b"\xEF\xBB\xBFsubject = \"x\"").unwrap();
        assert_eq!(ok.subject.as_deref(), Some("x"));
    }

    #[test]
    fn placeholders_split_and_escape() {
        assert_eq!(
            pieces("Gentile {nome}, {{x}} }").unwrap(),
            vec![
                Piece::Text("Gentile ".into()),
                Piece::Column("nome".into()),
                Piece::Text(", {x} }".into()),
            ]
        );
        assert!(pieces("a {nome").is_err());
        assert!(pieces("a {}").is_err());
        assert!(pieces("a {b {c}").is_err());
        assert_eq!(pieces("{ é }").unwrap(), vec![Piece::Column("é".into())]);
    }

    #[test]
    fn a_single_letter_with_placeholders_is_refused() {
        let e = Envelope::parse("subject = \"Avviso per {nome}\"\nbody = \"{{ok}}\"").unwrap();
        let p = e.check_placeholders(None, "avviso.csv");
        assert_eq!(fields(&p), ["subject"]);
        assert!(p[0].en.contains("avviso.csv"));
        let x = e.expand(&|_| None);
        assert_eq!(x.unwrap_err(), ["nome"]);
    }

    #[test]
    fn delimiters_are_detected() {
        assert_eq!(detect_delimiter("to;nome\n"), b';');
        assert_eq!(detect_delimiter("to,nome\n"), b',');
        assert_eq!(detect_delimiter("\"a;b\",c\n"), b',');
        assert_eq!(detect_delimiter("to\n"), b',');
    }

    #[test]
    fn csv_rows_are_numbered_like_a_spreadsheet() {
        let t = CsvTable::parse(b"\xEF\xBB\xBFto ; nome\na@b.it; Anna\n;\n\nc@d.it;\"Bo; B\"\n")
            .unwrap();
        assert_eq!(t.columns, ["to", "nome"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].number, 2);
        assert_eq!(t.rows[1].number, 5);
        assert_eq!(t.rows[1].cells, ["c@d.it", "Bo; B"]);
    }

    #[test]
    fn csv_header_problems() {
        let p = CsvTable::parse(b"To,nome,nome\nx,y,z\n").unwrap_err();
        assert_eq!(
            fields(&p),
            ["csv row 1, column nome", "csv row 1, column to"]
        );
        assert!(p[1].en.contains("there is \"To\""));
        let p = CsvTable::parse(b"to,nome\na,b,c\n").unwrap_err();
        assert_eq!(fields(&p), ["csv row 2"]);
        let p = CsvTable::parse(b"to;x\n\xff;y\n").unwrap_err();
        assert_eq!(fields(&p), ["csv, line 2"]);
        assert!(CsvTable::parse(b"").is_err());
        assert!(CsvTable::parse(b"to\n").is_err());
    }

    #[test]
    fn batches_expand_and_name_bad_cells() {
        let t = CsvTable::parse(b"to;nome;attachment\na@b.it;Anna;a.pdf\nc@d.it;;c.pdf\n").unwrap();
        let tpl =
            Envelope::parse("subject = \"Per {nome}\"\nattachments = [\"info.pdf\"]").unwrap();
        let p = expand_batch(&tpl, &t, "m.csv").unwrap_err();
        assert_eq!(fields(&p), ["csv row 3, column nome"]);
        let t =
            CsvTable::parse(b"to;nome;attachment\na@b.it;Anna;a.pdf\nc@d.it;Bo;c.pdf\n").unwrap();
        let rows = expand_batch(&tpl, &t, "m.csv").unwrap();
        assert_eq!(rows[1].name, "m.csv#3");
        assert_eq!(rows[1].envelope.to.as_deref().unwrap(), ["c@d.it"]);
        assert_eq!(rows[1].envelope.subject.as_deref(), Some("Per Bo"));
        assert_eq!(
            rows[1].envelope.attachments.as_deref().unwrap(),
            ["info.pdf", "c.pdf"]
        );
        let bad = Envelope::parse("subject = \"Per {Nome}\"").unwrap();
        let p = expand_batch(&bad, &t, "m.csv").unwrap_err();
        assert_eq!(fields(&p), ["subject"]);
        assert!(p[0].en.contains("columns: to, nome, attachment"));
    }

    #[test]
    fn row_problems_point_at_cells_or_the_template() {
        let t = CsvTable::parse(b"to;pec2;attachment\na@b.it;c@d.it;x.pdf\n").unwrap();
        let tpl = Envelope::parse(
            "cc = [\"{pec2}\", \"fisso@pec.example.it\"]\nsubject = \"S {to}\"\nattachments = [\"info.pdf\"]",
        )
        .unwrap();
        assert_eq!(column_of_field(&tpl, &t, "to[0]").as_deref(), Some("to"));
        assert_eq!(column_of_field(&tpl, &t, "cc[0]").as_deref(), Some("pec2"));
        assert_eq!(column_of_field(&tpl, &t, "cc[1]"), None);
        assert_eq!(column_of_field(&tpl, &t, "subject"), None);
        assert_eq!(
            column_of_field(&tpl, &t, "attachments[1]").as_deref(),
            Some("attachment")
        );
        assert!(is_literal_field(&tpl, "cc[1]"));
        assert!(is_literal_field(&tpl, "attachments[0]"));
        assert!(!is_literal_field(&tpl, "subject"));
        assert!(!is_literal_field(&tpl, "to[0]"));
    }

    #[test]
    fn lenient_readers_find_the_named_files() {
        let e =
            Envelope::parse_lenient(b"subjet = 1\nattachments = [\"a.pdf\", \"{doc}\"]").unwrap();
        let t = CsvTable::parse_lenient(
            b"to;doc;attachment\nx@y.it;b.pdf;c.pdf\nz@y.it;;d.pdf;extra\n",
        )
        .unwrap();
        assert_eq!(
            named_files_lenient(&e, Some(&t)),
            ["a.pdf", "b.pdf", "c.pdf", "d.pdf"]
        );
        assert_eq!(named_files_lenient(&e, None), ["a.pdf"]);
        assert!(Envelope::parse_lenient(b"to = [").is_none());
    }
}
