//! From an [`Envelope`] and the files it names to a [`Letter`], or every
//! [`Problem`] found. Reads the named files (in the claim folder) to size
//! and hash them; writes nothing.
//!
//! The rules (each refusal names its field and says what to do):
//!
//! - `to` (at least one) and `cc`: one address per item, a practical RFC 5321
//!   mailbox (`local@domain`, ASCII, the domain has a dot, labels of
//!   letters, digits and `-`; no display name, spaces, quotes or control
//!   characters). Stored lower case, duplicates dropped (an address in both
//!   `to` and `cc` stays in `to`), order kept.
//! - The mailbox's [`Limits`]: recipients (to + cc) at most
//!   `max_recipients`; documents' bytes × recipients at most
//!   `max_total_bytes` (providers count the message once per recipient);
//!   attachments whose last extension is blocked (`x.pdf.exe`).
//! - File names (`attachments`, `body_file`, the CSV `attachment` column,
//!   the envelope's own name): [`check_file_name`].
//! - Files: missing (with a hint when only the case differs), a folder, a
//!   symbolic link, not a regular file, unreadable, empty.
//! - `subject`: required, not blank, one line, at most
//!   [`MAX_SUBJECT_CHARS`] characters.
//! - Text: `body` or `body_file` (not both); the file is UTF-8, at most
//!   [`MAX_BODY_BYTES`]. An empty text is allowed when the letter has at
//!   least one document (the documents are the letter); a letter with
//!   neither text nor documents is refused.
//! - `kind`, `receipt`: exact wire names; defaults `altro`, `completa`.
//! - `protocol`, `reference`: one line, at most [`MAX_LABEL_CHARS`]; blank
//!   means absent. `in_reply_to`: a Message-ID (`...@...`), normalised.
//! - Duplicates: a letter whose [`content_hash`] the caller's store already
//!   knows is refused unless `allow_duplicate = true`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use openssl::sha::Sha256;

use super::envelope::{Envelope, utf8_text};
use super::{Document, DocumentKind, Letter, Problem, ReceiptType};
use crate::config::Limits;
use crate::pec::ids::normalize_message_id;

/// A subject has at most this many characters.
pub const MAX_SUBJECT_CHARS: usize = 500;
/// `protocol` and `reference` have at most this many characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// A file name has at most this many bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// A `body_file` has at most this many bytes.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// The version line that starts the canonical encoding hashed by
/// [`content_hash`]; a change of the encoding changes it.
pub const CONTENT_HASH_VERSION: &str = "pecgate-letter-v1";

/// A message in both languages.
type Msg = (String, String);
/// A document read: its size and SHA-256, or why it cannot be used.
type DocumentFacts = Result<(u64, String), Msg>;

/// What [`validate`] needs besides the envelope.
pub struct Context<'a> {
    /// Where the named files are (the claim folder).
    dir: &'a Path,
    /// Where else to look for a near miss when a file is missing (the
    /// outbox folder: a file whose name differs only in case stays there).
    also_look_in: Option<&'a Path>,
    /// The mailbox's limits.
    limits: &'a Limits,
    /// The store's answer to "was a letter with this content hash already
    /// sent?": the dispatch id, if so.
    is_duplicate: &'a dyn Fn(&str) -> Option<String>,
    /// Names that cannot be attachments (the envelope and its CSV).
    reserved: Vec<String>,
    /// Documents already read (a mass mailing names the same template
    /// documents on every row: each is read and hashed once).
    read: RefCell<HashMap<String, DocumentFacts>>,
}

impl<'a> Context<'a> {
    /// A context reading files from `dir`.
    pub fn new(
        dir: &'a Path,
        limits: &'a Limits,
        is_duplicate: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        Self {
            dir,
            also_look_in: None,
            limits,
            is_duplicate,
            reserved: Vec::new(),
            read: RefCell::new(HashMap::new()),
        }
    }

    /// Also look in `dir` for a file whose name differs only in case, to
    /// say so when a named file is missing.
    pub fn with_hint_dir(mut self, dir: &'a Path) -> Self {
        self.also_look_in = Some(dir);
        self
    }

    /// File names that may not be attached (the envelope, the CSV).
    pub fn with_reserved(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.reserved.extend(names);
        self
    }

    /// Reads and hashes a document once.
    fn document(&self, name: &str) -> DocumentFacts {
        if let Some(r) = self.read.borrow().get(name) {
            return r.clone();
        }
        let r = read_document(self.dir, name).map_err(|e| match e {
            ReadError::Missing => missing_file(name, self.dir, self.also_look_in),
            ReadError::Other(m) => m,
        });
        self.read.borrow_mut().insert(name.to_owned(), r.clone());
        r
    }
}

/// Validates one envelope named `name` (`certificato-77.toml`,
/// `massivo.csv#12`).
///
/// # Errors
///
/// Every problem found (the duplicate check runs only on an otherwise valid
/// letter).
pub fn validate(name: &str, env: &Envelope, ctx: &Context<'_>) -> Result<Letter, Vec<Problem>> {
    let mut problems = Vec::new();

    // Recipients.
    let mut seen: Vec<String> = Vec::new();
    let mut to = Vec::new();
    let mut cc = Vec::new();
    match &env.to {
        None => problems.push(Problem::new(
            "to",
            "manca \"to\", l'indirizzo PEC del destinatario: aggiungere una riga come to = [\"nome.cognome@pec.esempio.it\"]",
            "\"to\", the recipient's PEC address, is missing: add a line such as to = [\"name.surname@pec.example.it\"]",
        )),
        Some(list) if list.is_empty() => problems.push(Problem::new(
            "to",
            "\"to\" è vuoto: indicare almeno un destinatario, es. to = [\"nome.cognome@pec.esempio.it\"]",
            "\"to\" is empty: give at least one recipient, e.g. to = [\"name.surname@pec.example.it\"]",
        )),
        Some(_) => {}
    }
    for (key, list, out) in [("to", &env.to, &mut to), ("cc", &env.cc, &mut cc)] {
        for (i, raw) in list.iter().flatten().enumerate() {
            let a = raw.trim();
            match check_address(a) {
                Err((it, en)) => problems.push(Problem::new(format!("{key}[{i}]"), it, en)),
                Ok(()) => {
                    let a = a.to_ascii_lowercase();
                    if !seen.contains(&a) {
                        seen.push(a.clone());
                        out.push(a);
                    }
                }
            }
        }
    }
    let recipients = seen.len() as u64;
    if recipients > u64::from(ctx.limits.max_recipients) {
        let max = ctx.limits.max_recipients;
        problems.push(Problem::new(
            "to",
            format!(
                "troppi destinatari: {recipients} (to + cc), la casella ne ammette al massimo {max}: dividerli in più lettere"
            ),
            format!(
                "too many recipients: {recipients} (to + cc), the mailbox allows at most {max}: split them into several letters"
            ),
        ));
    }

    // Subject.
    let subject = match env.subject.as_deref().map(str::trim) {
        None => {
            problems.push(Problem::new(
                "subject",
                "manca l'oggetto: aggiungere una riga come subject = \"Certificato di residenza\"",
                "the subject is missing: add a line such as subject = \"Certificato di residenza\"",
            ));
            String::new()
        }
        Some("") => {
            problems.push(Problem::new(
                "subject",
                "l'oggetto è vuoto: scrivere un oggetto tra le virgolette",
                "the subject is empty: write a subject between the quotes",
            ));
            String::new()
        }
        Some(s) => {
            if s.chars().any(char::is_control) {
                problems.push(Problem::new(
                    "subject",
                    "l'oggetto deve stare su una riga sola, senza a capo, tabulazioni o caratteri di controllo",
                    "the subject must be a single line, without line breaks, tabs or control characters",
                ));
            }
            let n = s.chars().count();
            if n > MAX_SUBJECT_CHARS {
                problems.push(Problem::new(
                    "subject",
                    format!(
                        "l'oggetto è troppo lungo: {n} caratteri, al massimo {MAX_SUBJECT_CHARS}; il testo lungo va in body"
                    ),
                    format!(
                        "the subject is too long: {n} characters, at most {MAX_SUBJECT_CHARS}; long text goes in body"
                    ),
                ));
            }
            s.to_owned()
        }
    };

    // Text.
    let mut text_failed = false;
    let body = match (&env.body, &env.body_file) {
        (Some(_), Some(_)) => {
            problems.push(Problem::new(
                "body_file",
                "ci sono sia body sia body_file: tenerne uno solo (il testo scritto nella busta oppure il nome del file di testo)",
                "both body and body_file are given: keep only one (the text in the envelope or the name of the text file)",
            ));
            text_failed = true;
            String::new()
        }
        (Some(b), None) => b.clone(),
        (None, Some(file)) => match read_body_file(file, ctx) {
            Ok(b) => b,
            Err(p) => {
                problems.push(p);
                text_failed = true;
                String::new()
            }
        },
        (None, None) => String::new(),
    };
    if body
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c'))
    {
        let field = if env.body_file.is_some() {
            "body_file"
        } else {
            "body"
        };
        problems.push(Problem::new(
            field,
            "il testo contiene caratteri di controllo non stampabili: ricopiarlo da un editor di testo semplice",
            "the text contains unprintable control characters: copy it again from a plain-text editor",
        ));
    }

    // Documents.
    let mut attachments = Vec::new();
    let mut names_seen: Vec<&str> = Vec::new();
    for (i, raw) in env.attachments.iter().flatten().enumerate() {
        let field = format!("attachments[{i}]");
        if let Err((it, en)) = check_file_name(raw) {
            problems.push(Problem::new(field, it, en));
            continue;
        }
        if names_seen.contains(&raw.as_str()) {
            problems.push(Problem::new(
                field,
                format!("il documento \"{raw}\" è elencato due volte: toglierne una"),
                format!("the document \"{raw}\" is listed twice: remove one"),
            ));
            continue;
        }
        names_seen.push(raw);
        if ctx.reserved.iter().any(|r| r == raw) {
            problems.push(Problem::new(
                field,
                format!(
                    "\"{raw}\" è la busta (o il CSV) della lettera stessa e non può esserne un allegato: togliere il nome da attachments"
                ),
                format!(
                    "\"{raw}\" is the letter's own envelope (or CSV) and cannot be attached to it: remove the name from attachments"
                ),
            ));
            continue;
        }
        if ctx.limits.is_blocked(raw) {
            let ext = raw.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
            problems.push(Problem::new(
                field,
                format!(
                    "i file .{ext} non si possono inviare da questa casella (\"{raw}\"): inviare il documento in un formato ammesso, ad esempio PDF"
                ),
                format!(
                    ".{ext} files cannot be sent from this mailbox (\"{raw}\"): send the document in an allowed format, for example PDF"
                ),
            ));
            continue;
        }
        match ctx.document(raw) {
            Ok((size, sha256)) => attachments.push(Document {
                name: raw.clone(),
                path: ctx.dir.join(raw),
                size,
                sha256,
            }),
            Err((it, en)) => problems.push(Problem::new(field, it, en)),
        }
    }
    if body.trim().is_empty() && !text_failed && env.attachments.as_ref().is_none_or(Vec::is_empty)
    {
        problems.push(Problem::new(
            "body",
            "la lettera non ha né testo né documenti: scrivere il testo in body (o in un file indicato da body_file) oppure elencare i documenti in attachments",
            "the letter has neither text nor documents: write the text in body (or in a file named by body_file) or list the documents in attachments",
        ));
    }
    let total: u64 = attachments.iter().map(|d| d.size).sum();
    let weighed = total.saturating_mul(recipients.max(1));
    if weighed > ctx.limits.max_total_bytes {
        let max = ctx.limits.max_total_bytes;
        problems.push(Problem::new(
            "attachments",
            format!(
                "i documenti pesano {} e con {} destinatari fanno {}, oltre il limite di {} della casella: ridurre i documenti (es. PDF compressi) o dividere i destinatari in più lettere",
                human(total),
                recipients.max(1),
                human(weighed),
                human(max)
            ),
            format!(
                "the documents weigh {} and with {} recipients make {}, over the mailbox's limit of {}: make the documents smaller (e.g. compressed PDF) or split the recipients into several letters",
                human(total),
                recipients.max(1),
                human(weighed),
                human(max)
            ),
        ));
    }

    // Labels.
    let kind = match env.kind.as_deref() {
        None => DocumentKind::Other,
        Some(k) => match k.parse::<DocumentKind>() {
            Ok(k) => k,
            Err(_) => {
                problems.push(choice_problem("kind", k, &kinds()));
                DocumentKind::Other
            }
        },
    };
    let receipt = match env.receipt.as_deref() {
        None => ReceiptType::Completa,
        Some(r) => match [
            ReceiptType::Completa,
            ReceiptType::Breve,
            ReceiptType::Sintetica,
        ]
        .into_iter()
        .find(|t| t.as_str() == r)
        {
            Some(t) => t,
            None => {
                problems.push(choice_problem(
                    "receipt",
                    r,
                    &["completa", "breve", "sintetica"],
                ));
                ReceiptType::Completa
            }
        },
    };
    let protocol = label("protocol", env.protocol.as_deref(), &mut problems);
    let reference = label("reference", env.reference.as_deref(), &mut problems);
    let in_reply_to = match env.in_reply_to.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => {
            let n = normalize_message_id(raw);
            match n {
                Some(id)
                    if id.contains('@')
                        && !id.chars().any(|c| c.is_control() || c == '"')
                        && id.len() <= 998 =>
                {
                    Some(id)
                }
                _ => {
                    problems.push(Problem::new(
                        "in_reply_to",
                        format!(
                            "\"{}\" non è un identificativo di messaggio: copiare l'identificativo del messaggio PEC ricevuto (ha la forma opec...@pec.esempio.it), oppure togliere la riga",
                            shown(raw)
                        ),
                        format!(
                            "\"{}\" is not a message identifier: copy the identificativo of the certified message received (it looks like opec...@pec.example.it), or remove the line",
                            shown(raw)
                        ),
                    ));
                    None
                }
            }
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    let mut letter = Letter {
        name: name.to_owned(),
        to,
        cc,
        subject,
        body,
        attachments,
        kind,
        protocol,
        reference,
        receipt,
        in_reply_to,
        allow_duplicate: env.allow_duplicate.unwrap_or(false),
        content_hash: String::new(),
    };
    letter.content_hash = content_hash(&letter);
    if !letter.allow_duplicate
        && let Some(id) = (ctx.is_duplicate)(&letter.content_hash)
    {
        return Err(vec![duplicate_problem(&id)]);
    }
    Ok(letter)
}

/// The problem of a letter identical to one already sent (dispatch `id`,
/// or another letter of the same batch).
pub fn duplicate_problem(id: &str) -> Problem {
    Problem::new(
        "allow_duplicate",
        format!(
            "una lettera identica (stessi destinatari, oggetto, testo e documenti) è già stata inviata: spedizione {id}. Se va davvero inviata di nuovo, aggiungere alla busta la riga allow_duplicate = true"
        ),
        format!(
            "an identical letter (same recipients, subject, text and documents) was already sent: dispatch {id}. If it really must be sent again, add the line allow_duplicate = true to the envelope"
        ),
    )
}

/// The lowercase hex SHA-256 identifying a letter's content, independent of
/// its file names on disk, of modification times, of key order in the
/// envelope, of the order of recipients and documents, and of
/// `allow_duplicate`.
///
/// The hashed bytes are the line `pecgate-letter-v1\n` followed by records
/// `KEY SP LEN ":" VALUE "\n"` (LEN = the byte length of VALUE in decimal,
/// so no value can be confused with the next record), in this order: `to`
/// (each address, sorted), `cc` (each, sorted), `subject`, `body` (CRLF and
/// lone CR turned into LF), `kind`, `protocol` (if any), `reference` (if
/// any), `receipt`, `in_reply_to` (if any), then for each document, sorted
/// by name then hash, `document` (its name) and `sha256` (its hash, hex).
pub fn content_hash(letter: &Letter) -> String {
    let mut h = Sha256::new();
    h.update(CONTENT_HASH_VERSION.as_bytes());
    h.update(b"\n");
    let mut record = |key: &str, value: &str| {
        h.update(key.as_bytes());
        h.update(format!(" {}:", value.len()).as_bytes());
        h.update(value.as_bytes());
        h.update(b"\n");
    };
    for list in [("to", &letter.to), ("cc", &letter.cc)] {
        let mut sorted: Vec<&String> = list.1.iter().collect();
        sorted.sort();
        for a in sorted {
            record(list.0, a);
        }
    }
    record("subject", &letter.subject);
    record(
        "body",
        &letter.body.replace("\r\n", "\n").replace('\r', "\n"),
    );
    record("kind", letter.kind.as_str());
    if let Some(p) = &letter.protocol {
        record("protocol", p);
    }
    if let Some(r) = &letter.reference {
        record("reference", r);
    }
    record("receipt", letter.receipt.as_str());
    if let Some(r) = &letter.in_reply_to {
        record("in_reply_to", r);
    }
    let mut docs: Vec<(&str, &str)> = letter
        .attachments
        .iter()
        .map(|d| (d.name.as_str(), d.sha256.as_str()))
        .collect();
    docs.sort();
    for (name, sha) in docs {
        record("document", name);
        record("sha256", sha);
    }
    hex(&h.finish())
}

pub(crate) use crate::store::hex;

// ---------------------------------------------------------------------------
// Addresses

/// Checks a PEC address: a practical RFC 5321 mailbox, `local@domain`.
///
/// # Errors
///
/// What is wrong and how to write it, in Italian and English.
pub fn check_address(a: &str) -> Result<(), (String, String)> {
    let bad = |it: &str, en: &str| {
        Err((
            format!("l'indirizzo \"{}\" non è valido: {it}", shown(a)),
            format!("the address \"{}\" is not valid: {en}", shown(a)),
        ))
    };
    if a.is_empty() {
        return Err((
            "indirizzo vuoto: scrivere un indirizzo PEC tra le virgolette o togliere l'elemento"
                .to_owned(),
            "empty address: write a PEC address between the quotes or remove the item".to_owned(),
        ));
    }
    if a.contains(['<', '>']) {
        return bad(
            "scrivere solo l'indirizzo, senza nome né parentesi angolari (es. mario.rossi@pec.esempio.it)",
            "write the address alone, without a name or angle brackets (e.g. mario.rossi@pec.example.it)",
        );
    }
    if a.contains([',', ';']) {
        return bad(
            "un solo indirizzo per elemento: separare gli indirizzi così: to = [\"primo@pec.esempio.it\", \"secondo@pec.esempio.it\"]",
            "one address per item: separate addresses like this: to = [\"first@pec.example.it\", \"second@pec.example.it\"]",
        );
    }
    if a.chars().any(char::is_control) {
        return bad(
            "contiene caratteri di controllo (a capo, tabulazioni): riscriverlo su una riga",
            "it contains control characters (line breaks, tabs): write it on one line",
        );
    }
    if a.chars().any(char::is_whitespace) {
        return bad(
            "contiene spazi: toglierli",
            "it contains spaces: remove them",
        );
    }
    if a.contains(['"', '\'', '`']) {
        return bad(
            "contiene virgolette o apici: toglierli",
            "it contains quotes or apostrophes: remove them",
        );
    }
    if let Some(c) = a.chars().find(|c| !c.is_ascii()) {
        return bad(
            &format!(
                "contiene il carattere \"{c}\": gli indirizzi PEC usano solo lettere senza accenti, cifre e . - _"
            ),
            &format!(
                "it contains the character \"{c}\": PEC addresses use only unaccented letters, digits and . - _"
            ),
        );
    }
    let Some((local, domain)) = a.split_once('@') else {
        return bad(
            "manca la @ (es. nome.cognome@pec.esempio.it)",
            "the @ is missing (e.g. name.surname@pec.example.it)",
        );
    };
    if domain.contains('@') {
        return bad(
            "contiene più di una @: un solo indirizzo per elemento",
            "it contains more than one @: one address per item",
        );
    }
    if local.is_empty() {
        return bad(
            "manca la parte prima della @",
            "the part before the @ is missing",
        );
    }
    if local.len() > 64 {
        return bad(
            "la parte prima della @ supera 64 caratteri",
            "the part before the @ is longer than 64 characters",
        );
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return bad(
            "la parte prima della @ non può iniziare o finire con un punto, né avere due punti di fila",
            "the part before the @ cannot start or end with a dot, nor have two dots in a row",
        );
    }
    if let Some(c) = local
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "!#$%&*+-/=?^_{|}~.".contains(*c)))
    {
        return bad(
            &format!("la parte prima della @ contiene il carattere \"{c}\", non ammesso"),
            &format!("the part before the @ contains the character \"{c}\", which is not allowed"),
        );
    }
    if domain.is_empty() {
        return bad(
            "manca il dominio dopo la @ (es. nome@pec.esempio.it)",
            "the domain after the @ is missing (e.g. name@pec.example.it)",
        );
    }
    if domain.starts_with('[') {
        return bad(
            "il dominio deve essere un nome, non un indirizzo IP tra parentesi quadre",
            "the domain must be a name, not an IP address in square brackets",
        );
    }
    if !domain.contains('.') {
        return bad(
            "manca il dominio completo (es. nome@pec.esempio.it)",
            "the complete domain is missing (e.g. name@pec.example.it)",
        );
    }
    if domain.len() > 253 || a.len() > 254 {
        return bad("è troppo lungo", "it is too long");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return bad(
                "il dominio ha un punto all'inizio, alla fine o due punti di fila",
                "the domain has a dot at the start, at the end or two dots in a row",
            );
        }
        if label.len() > 63 {
            return bad(
                "una parte del dominio supera 63 caratteri",
                "a part of the domain is longer than 63 characters",
            );
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return bad(
                &format!(
                    "il dominio contiene il carattere \"{c}\": sono ammessi lettere, cifre, - e ."
                ),
                &format!(
                    "the domain contains the character \"{c}\": letters, digits, - and . are allowed"
                ),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(
                "una parte del dominio inizia o finisce con -",
                "a part of the domain starts or ends with -",
            );
        }
    }
    if domain
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return bad(
            "il dominio deve finire con un nome (es. .it), non con un numero",
            "the domain must end with a name (e.g. .it), not with a number",
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// File names

/// Checks a file name named by an envelope (or an envelope's own name): a
/// plain name in the outbox folder that every clerk's computer can show.
///
/// # Errors
///
/// What is wrong and how to fix it, in Italian and English.
pub fn check_file_name(name: &str) -> Result<(), (String, String)> {
    let bad = |it: &str, en: &str| {
        Err((
            format!("il nome di file \"{}\" non è ammesso: {it}", shown(name)),
            format!("the file name \"{}\" is not allowed: {en}", shown(name)),
        ))
    };
    if name.is_empty() {
        return Err((
            "nome di file vuoto: scrivere il nome del file tra le virgolette o togliere l'elemento"
                .to_owned(),
            "empty file name: write the file's name between the quotes or remove the item"
                .to_owned(),
        ));
    }
    let b = name.as_bytes();
    if name.starts_with(['/', '\\']) || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
    {
        return bad(
            "è un percorso assoluto: scrivere solo il nome del file, che deve trovarsi nella cartella outbox accanto alla busta",
            "it is an absolute path: write the file's name alone; the file must be in the outbox folder next to the envelope",
        );
    }
    if name.split(['/', '\\']).any(|part| part == "..") {
        return bad(
            "contiene \"..\" (cartella superiore): il file deve trovarsi nella cartella outbox accanto alla busta",
            "it contains \"..\" (parent folder): the file must be in the outbox folder next to the envelope",
        );
    }
    if name.contains(['/', '\\']) {
        return bad(
            "contiene una barra: niente sottocartelle, mettere il file direttamente nella cartella outbox",
            "it contains a slash: no subfolders, put the file directly in the outbox folder",
        );
    }
    if name.chars().any(char::is_control) {
        return bad(
            "contiene caratteri di controllo (a capo, tabulazioni): rinominare il file",
            "it contains control characters (line breaks, tabs): rename the file",
        );
    }
    if name.starts_with('.') {
        return bad(
            "inizia con un punto (file nascosto): rinominare il file",
            "it starts with a dot (a hidden file): rename the file",
        );
    }
    if name.trim() != name {
        return bad(
            "inizia o finisce con uno spazio: toglierlo dal nome del file e dalla busta",
            "it starts or ends with a space: remove it from the file's name and from the envelope",
        );
    }
    if let Some(c) = name.chars().find(|c| "<>:\"|?*".contains(*c)) {
        return bad(
            &format!("contiene il carattere \"{c}\", vietato in Windows: rinominare il file"),
            &format!("it contains the character \"{c}\", forbidden on Windows: rename the file"),
        );
    }
    if name.ends_with('.') {
        return bad(
            "finisce con un punto: rinominare il file",
            "it ends with a dot: rename the file",
        );
    }
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    let upper = stem.to_ascii_uppercase();
    let reserved = matches!(
        upper.as_str(),
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$"
    ) || ["COM", "LPT"].iter().any(|p| {
        upper.strip_prefix(p).is_some_and(|d| {
            (d.len() == 1 && d.as_bytes()[0].is_ascii_digit()) || matches!(d, "¹" | "²" | "³")
        })
    });
    if reserved {
        return bad(
            &format!("\"{stem}\" è un nome riservato in Windows: rinominare il file"),
            &format!("\"{stem}\" is a reserved name on Windows: rename the file"),
        );
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(
            &format!(
                "è troppo lungo ({} byte, al massimo {MAX_NAME_BYTES}): accorciarlo",
                name.len()
            ),
            &format!(
                "it is too long ({} bytes, at most {MAX_NAME_BYTES}): shorten it",
                name.len()
            ),
        );
    }
    Ok(())
}

/// Checks a file name as it is on disk (bytes on Linux).
///
/// # Errors
///
/// A name that is not UTF-8, or that [`check_file_name`] refuses.
pub fn check_os_name(name: &std::ffi::OsStr) -> Result<&str, (String, String)> {
    use std::os::unix::ffi::OsStrExt as _;
    match std::str::from_utf8(name.as_bytes()) {
        Ok(s) => check_file_name(s).map(|()| s),
        Err(_) => Err((
            format!(
                "il nome di file \"{}\" contiene byte non validi in UTF-8 (lettere accentate scritte con un'altra codifica): rinominare il file usando lettere, cifre, - e _",
                name.to_string_lossy()
            ),
            format!(
                "the file name \"{}\" contains bytes that are not valid UTF-8 (accented letters written in another encoding): rename the file using letters, digits, - and _",
                name.to_string_lossy()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------
// Files

enum ReadError {
    Missing,
    Other(Msg),
}

/// Reads a regular file of `dir` (never following a symbolic link) and
/// returns its size and SHA-256.
fn read_document(dir: &Path, name: &str) -> Result<(u64, String), ReadError> {
    let path = dir.join(name);
    let mut file = open_regular(&path, name)?;
    let mut h = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Other(unreadable(name, &e))),
        }
    }
    if size == 0 {
        return Err(ReadError::Other((
            format!(
                "il file \"{name}\" è vuoto (0 byte): forse la copia non è finita o non è riuscita; copiarlo di nuovo"
            ),
            format!(
                "the file \"{name}\" is empty (0 bytes): perhaps the copy did not finish or failed; copy it again"
            ),
        )));
    }
    Ok((size, hex(&h.finish())))
}

fn open_regular(path: &Path, name: &str) -> Result<std::fs::File, ReadError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(ReadError::Other(unreadable(name, &e))),
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(ReadError::Other((
            format!(
                "\"{name}\" è un collegamento simbolico: copiare nella cartella il file vero e proprio"
            ),
            format!("\"{name}\" is a symbolic link: copy the actual file into the folder"),
        )));
    }
    if ft.is_dir() {
        return Err(ReadError::Other((
            format!(
                "\"{name}\" è una cartella, non un file: le sottocartelle non sono ammesse, copiare i file direttamente nella cartella outbox"
            ),
            format!(
                "\"{name}\" is a folder, not a file: subfolders are not allowed, copy the files directly into the outbox folder"
            ),
        )));
    }
    if !ft.is_file() {
        return Err(ReadError::Other((
            format!("\"{name}\" non è un file normale: copiare nella cartella un file normale"),
            format!("\"{name}\" is not a regular file: copy a regular file into the folder"),
        )));
    }
    std::fs::File::open(path).map_err(|e| ReadError::Other(unreadable(name, &e)))
}

fn unreadable(name: &str, e: &std::io::Error) -> Msg {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        (
            format!(
                "il gateway non ha il permesso di leggere \"{name}\": controllare i permessi del file (deve essere leggibile dal gruppo del gateway) e copiarlo di nuovo"
            ),
            format!(
                "the gateway is not allowed to read \"{name}\": check the file's permissions (it must be readable by the gateway's group) and copy it again"
            ),
        )
    } else {
        (
            format!("impossibile leggere \"{name}\" ({e}): copiarlo di nuovo"),
            format!("\"{name}\" cannot be read ({e}): copy it again"),
        )
    }
}

fn missing_file(name: &str, dir: &Path, also: Option<&Path>) -> Msg {
    // A folder is never taken into a claim: it stays in the outbox.
    if let Some(a) = also
        && std::fs::symlink_metadata(a.join(name)).is_ok_and(|m| m.is_dir())
    {
        return (
            format!(
                "\"{name}\" è una cartella, non un file: le sottocartelle non sono ammesse, copiare i file direttamente nella cartella outbox"
            ),
            format!(
                "\"{name}\" is a folder, not a file: subfolders are not allowed, copy the files directly into the outbox folder"
            ),
        );
    }
    let near = [Some(dir), also]
        .into_iter()
        .flatten()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.filter_map(|e| e.ok()))
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n != name && n.to_lowercase() == name.to_lowercase());
    let (it_hint, en_hint) = match near {
        Some(n) => (
            format!(" (c'è \"{n}\": il nome deve coincidere anche nelle maiuscole)"),
            format!(" (there is \"{n}\": the name must match in upper/lower case too)"),
        ),
        None => (String::new(), String::new()),
    };
    (
        format!(
            "il file \"{name}\" non è nella cartella outbox{it_hint}: copiarlo accanto alla busta con esattamente questo nome, oppure correggere il nome nella busta"
        ),
        format!(
            "the file \"{name}\" is not in the outbox folder{en_hint}: copy it next to the envelope with exactly this name, or fix the name in the envelope"
        ),
    )
}

fn read_body_file(file: &str, ctx: &Context<'_>) -> Result<String, Problem> {
    let p = |(it, en): Msg| Problem::new("body_file", it, en);
    check_file_name(file).map_err(p)?;
    let path = ctx.dir.join(file);
    let f = open_regular(&path, file).map_err(|e| match e {
        ReadError::Missing => p(missing_file(file, ctx.dir, ctx.also_look_in)),
        ReadError::Other(m) => p(m),
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| p(unreadable(file, &e)))?;
    if bytes.len() as u64 > MAX_BODY_BYTES {
        return Err(p((
            format!(
                "il file di testo \"{file}\" supera {} : un testo così lungo va inviato come documento allegato (es. PDF)",
                human(MAX_BODY_BYTES)
            ),
            format!(
                "the text file \"{file}\" is larger than {}: such a long text must be sent as an attached document (e.g. PDF)",
                human(MAX_BODY_BYTES)
            ),
        )));
    }
    let text = utf8_text(&bytes, "body_file").map_err(|mut ps| {
        let mut first = ps.remove(0);
        first.it = format!("\"{file}\": {}", first.it);
        first.en = format!("\"{file}\": {}", first.en);
        first
    })?;
    Ok(text.to_owned())
}

// ---------------------------------------------------------------------------
// Small helpers

fn kinds() -> Vec<&'static str> {
    DocumentKind::ALL.iter().map(|k| k.as_str()).collect()
}

fn choice_problem(key: &str, value: &str, allowed: &[&str]) -> Problem {
    let list = allowed.join(", ");
    Problem::new(
        key,
        format!(
            "\"{}\" non è un valore ammesso per {key}: scrivere uno di {list} (minuscolo)",
            shown(value)
        ),
        format!(
            "\"{}\" is not an allowed value for {key}: write one of {list} (lower case)",
            shown(value)
        ),
    )
}

fn label(key: &str, value: Option<&str>, problems: &mut Vec<Problem>) -> Option<String> {
    let v = value.map(str::trim).filter(|v| !v.is_empty())?;
    if v.chars().any(char::is_control) {
        problems.push(Problem::new(
            key,
            format!("{key} deve stare su una riga, senza a capo né caratteri di controllo"),
            format!("{key} must be a single line, without line breaks or control characters"),
        ));
    }
    let n = v.chars().count();
    if n > MAX_LABEL_CHARS {
        problems.push(Problem::new(
            key,
            format!("{key} è troppo lungo: {n} caratteri, al massimo {MAX_LABEL_CHARS}"),
            format!("{key} is too long: {n} characters, at most {MAX_LABEL_CHARS}"),
        ));
    }
    Some(v.to_owned())
}

/// A value as shown in a message: control characters escaped, at most 120
/// characters.
pub(crate) fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 120 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes for people: `12 345 byte` below 10 kB, else kB / MB with one
/// decimal (decimal units, as providers state their limits).
fn human(n: u64) -> String {
    const K: f64 = 1000.0;
    let f = n as f64;
    if n < 10_000 {
        format!("{n} byte")
    } else if f < K * K {
        format!("{:.1} kB", f / K)
    } else {
        format!("{:.1} MB", f / (K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "mario.rossi@pec.example.it",
            "UFFICIO_Protocollo+x@PEC.Comune.Example.IT",
            "a@b.co",
        ] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("mario.rossi@pec", "dominio completo"),
            ("Mario Rossi <mario@pec.it>", "senza nome"),
            ("<mario@pec.it>", "senza nome"),
            ("mario rossi@pec.it", "spazi"),
            ("mario@pec.it,luigi@pec.it", "un solo indirizzo"),
            ("mario.pec.it", "manca la @"),
            ("@pec.it", "prima della @"),
            ("mario@", "manca il dominio"),
            ("a@b@c.it", "più di una @"),
            ("\"a\"@b.it", "virgolette"),
            ("mar\nio@b.it", "controllo"),
            ("nicolò@pec.it", "\"ò\""),
            (".a@b.it", "punto"),
            ("a..b@b.it", "punto"),
            ("a@b..it", "due punti"),
            ("a@-b.it", "inizia o finisce con -"),
            ("a@b_c.it", "\"_\""),
            ("a@[1.2.3.4]", "indirizzo IP"),
            ("a@1.2.3.4", "numero"),
            ("", "vuoto"),
        ] {
            let (it, en) = check_address(bad).unwrap_err();
            assert!(it.contains(why), "{bad}: {it}");
            assert!(!en.is_empty());
        }
    }

    #[test]
    fn file_names() {
        for ok in [
            "certificato.pdf",
            "Lettera del sindaco (2).pdf",
            "città.odt",
            "CONTO.pdf",
        ] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("../x", ".."),
            ("/etc/passwd", "assoluto"),
            ("C:\\x.pdf", "assoluto"),
            ("a/b.pdf", "barra"),
            ("a\\b.pdf", "barra"),
            ("a\nb", "controllo"),
            (".nascosto", "punto"),
            (" x.pdf", "spazio"),
            ("x?.pdf", "\"?\""),
            ("x.pdf.", "finisce con un punto"),
            ("CON", "riservato"),
            ("con.pdf", "riservato"),
            ("LPT1.txt", "riservato"),
            ("", "vuoto"),
        ] {
            let (it, _) = check_file_name(bad).unwrap_err();
            assert!(it.contains(why), "{bad:?}: {it}");
        }
        let long = "a".repeat(201);
        assert!(check_file_name(&long).unwrap_err().1.contains("too long"));
        use std::os::unix::ffi::OsStrExt as _;
        let raw = std::ffi::OsStr::from_bytes(b"caf\xe8.pdf");
        assert!(check_os_name(raw).unwrap_err().1.contains("UTF-8"));
    }

    fn letter() -> Letter {
        Letter {
            name: "x.toml".into(),
            to: vec!["a@b.it".into(), "c@d.it".into()],
            cc: vec![],
            subject: "S".into(),
            body: "line\r\nnext".into(),
            attachments: vec![
                Document {
                    name: "a.pdf".into(),
                    path: "/1/a.pdf".into(),
                    size: 1,
                    sha256: "aa".into(),
                },
                Document {
                    name: "b.pdf".into(),
                    path: "/1/b.pdf".into(),
                    size: 1,
                    sha256: "bb".into(),
                },
            ],
            kind: DocumentKind::Other,
            protocol: None,
            reference: None,
            receipt: ReceiptType::Completa,
            in_reply_to: None,
            allow_duplicate: false,
            content_hash: String::new(),
        }
    }

    #[test]
    fn the_content_hash_ignores_order_paths_and_line_ends() {
        let a = letter();
        let mut b = letter();
        b.to.reverse();
        b.attachments.reverse();
        b.attachments[0].path = "/2/b.pdf".into();
        b.body = "line\nnext".into();
        b.name = "y.toml".into();
        b.allow_duplicate = true;
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a).len(), 64);
        let mut c = letter();
        c.subject = "S ".into();
        assert_ne!(content_hash(&a), content_hash(&c));
        let mut d = letter();
        d.protocol = Some(String::new());
        assert_ne!(content_hash(&a), content_hash(&d));
        let mut e = letter();
        e.attachments[1].sha256 = "cc".into();
        assert_ne!(content_hash(&a), content_hash(&e));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(999), "999 byte");
        assert_eq!(human(120_000_000), "120.0 MB");
    }
}
